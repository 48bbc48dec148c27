"""Who may call what: bearer tokens and roles, enforced for every RPC in one server interceptor.

Every call carries `authorization: Bearer poe_<id>_<secret>` (services/tokens.py has the format).
The interceptor maps the token to a principal and the method to the permission it needs
(METHOD_PERMISSIONS, which names every method of the three services: a method missing from it is
refused, so a new RPC cannot be forgotten). Callers without a token are the anonymous principal,
whose role is settings.anonymous_role: `auto` gives reader while the server listens on loopback
only, and nothing otherwise.

- no token, or one that is unknown, expired or revoked: UNAUTHENTICATED;
- a role without the permission: PERMISSION_DENIED.
Neither message depends on the request's content, so neither tells whether a resource exists.

Roles and what they may do:
- reader: read (ComposeModel, Describe*, Get*, List*, ResolveClasses, Download, Watch*);
- publisher: read, publish (register, publish, aliases, StartExtraction; CancelExtraction of its own jobs);
- admin: read, publish, admin (DeletePoolVersion, anyone's jobs);
- service: read, publish, internal (what the services call on each other: CreateExtractionJob,
  UpdateExtractionJob, PutComposedModel, PutComposedModels).
Health and reflection are open to everyone (probes and tools that know only the protos).
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc

from poe.engine.config import Settings, is_loopback, split_host
from poe.engine.errors import PermissionDenied, ResourceExhausted
from poe_services.tokens import Principal, TokenVerifier

log = logging.getLogger(__name__)

READ, PUBLISH, ADMIN, INTERNAL = "read", "publish", "admin", "internal"
ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "reader": frozenset({READ}),
    "publisher": frozenset({READ, PUBLISH}),
    "admin": frozenset({READ, PUBLISH, ADMIN}),
    "service": frozenset({READ, PUBLISH, INTERNAL}),
}

_REGISTRY = {
    "RegisterHierarchy": PUBLISH, "GetHierarchy": READ,
    "RegisterOracle": PUBLISH, "GetOracle": READ,
    "RegisterLibrary": PUBLISH, "GetLibrary": READ,
    "RegisterExpert": PUBLISH, "GetExpert": READ, "ListExperts": READ,
    "PublishPool": PUBLISH, "GetPool": READ, "ListPools": READ,
    "SetPoolAlias": PUBLISH, "DeletePoolAlias": PUBLISH, "DeletePoolVersion": ADMIN,
    "ResolveClasses": READ, "Download": READ,
    "PutComposedModel": INTERNAL, "PutComposedModels": INTERNAL, "GetComposedModel": READ,
    "CreateExtractionJob": INTERNAL, "UpdateExtractionJob": INTERNAL,
    "GetExtractionJob": READ, "ListExtractionJobs": READ,
    "GetLineage": READ,
}
_COMPOSER = {"ComposeModel": READ, "DescribeComposition": READ}
# CancelExtraction also checks the job's owner (require_owner), in the servicer: only it knows the job.
_EXTRACTOR = {"StartExtraction": PUBLISH, "WatchExtraction": READ, "GetExtraction": READ,
              "ListExtractions": READ, "CancelExtraction": PUBLISH}
METHOD_PERMISSIONS: dict[str, str] = {
    **{f"/poe.v1.Registry/{m}": p for m, p in _REGISTRY.items()},
    **{f"/poe.v1.Composer/{m}": p for m, p in _COMPOSER.items()},
    **{f"/poe.v1.Extractor/{m}": p for m, p in _EXTRACTOR.items()},
}
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")

ANONYMOUS = "anonymous"
# The key of an extraction job's params, beside its spec, that records who started it.
OWNER_KEY = "owner"
_PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("poe_principal", default=None)


def anonymous_role(settings: Settings, listen_address: str) -> str | None:
    """The role of callers without a token on a server listening on `listen_address`."""
    role = settings.anonymous_role
    if role == "auto":
        return "reader" if is_loopback(split_host(listen_address)) else None
    return None if role == "none" else role


def current_principal() -> Principal | None:
    """The caller of the RPC this thread is serving (None outside an RPC)."""
    return _PRINCIPAL.get()


def owner_id(principal: Principal | None) -> str:
    """What a job records as its owner."""
    return principal.id if principal and principal.id else ANONYMOUS


def require_owner(owner: str, what: str = "job") -> None:
    """PermissionDenied unless the caller owns the resource or is admin/service."""
    p = current_principal()
    if p is None or p.role in ("admin", "service"):
        return  # not within an RPC (in-process use), or allowed to act on anyone's
    if not owner or owner_id(p) != owner:
        raise PermissionDenied(f"only the {what}'s owner or an admin may do this")


def _bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def _aborting(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that fails every call with `code`."""
    def abort(_request, context):
        context.abort(code, message)

    return _replace(handler, lambda _behavior: abort)


def _with_principal(handler: grpc.RpcMethodHandler, principal: Principal) -> grpc.RpcMethodHandler:
    def wrap(behavior: Callable) -> Callable:
        if handler.response_streaming:
            def streaming(request, context) -> Iterator:
                token = _PRINCIPAL.set(principal)
                try:
                    yield from behavior(request, context)
                finally:
                    _PRINCIPAL.reset(token)
            return streaming

        def unary(request, context):
            token = _PRINCIPAL.set(principal)
            try:
                return behavior(request, context)
            finally:
                _PRINCIPAL.reset(token)
        return unary

    return _replace(handler, wrap)


def _replace(handler: grpc.RpcMethodHandler, wrap: Callable[[Callable], Callable]) -> grpc.RpcMethodHandler:
    kinds = {(False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
             (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
             (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
             (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler)}
    attr, make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(wrap(getattr(handler, attr)), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates and authorizes every call before its servicer runs."""

    def __init__(self, verifier: TokenVerifier, anonymous: str | None):
        if anonymous is not None and anonymous not in ROLE_PERMISSIONS:
            raise ValueError(f"unknown anonymous role {anonymous!r}")
        self.verifier = verifier
        self.anonymous = Principal("", ANONYMOUS, anonymous) if anonymous else None

    def authorize(self, method: str, metadata) -> tuple[Principal | None, grpc.StatusCode | None, str]:
        """(principal, None, "") when the call may go on, else (None, code, message)."""
        token = _bearer(metadata)
        if token is None:
            principal = self.anonymous
        else:
            principal = self.verifier.verify(token)
            if principal is None:
                return None, grpc.StatusCode.UNAUTHENTICATED, "invalid, expired or revoked bearer token"
        if principal is None:
            return None, grpc.StatusCode.UNAUTHENTICATED, \
                "this server needs a bearer token (metadata 'authorization: Bearer poe_...')"
        needed = METHOD_PERMISSIONS.get(method)
        if needed is None or needed not in ROLE_PERMISSIONS[principal.role]:
            who = "anonymous callers" if principal.anonymous else f"role {principal.role}"
            return None, grpc.StatusCode.PERMISSION_DENIED, f"{who} may not call {method.rsplit('/', 1)[-1]}"
        return principal, None, ""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        principal, code, message = self.authorize(method, handler_call_details.invocation_metadata)
        if code is not None:
            log.info("refused %s: %s", method, code.name)
            return _aborting(handler, code, message)
        return _with_principal(handler, principal)


class UploadQuota:
    """Bytes each caller may have in unfinished uploads at once (staged blobs on the registry): one
    caller cannot fill the staging area for everyone else. Uploads declare their size first."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}

    @contextmanager
    def reserve(self, size: int) -> Iterator[None]:
        who = owner_id(current_principal())
        size = int(size) if size > 0 else self.limit  # an upload of undeclared size may take the whole quota
        with self._lock:
            used = self._in_flight.get(who, 0)
            if used + size > self.limit:
                raise ResourceExhausted(f"upload quota: {used + size} bytes in unfinished uploads would exceed the "
                                        f"{self.limit} allowed per caller (POE_UPLOAD_QUOTA_BYTES); retry when others "
                                        "have finished")
            self._in_flight[who] = used + size
        try:
            yield
        finally:
            with self._lock:
                left = self._in_flight[who] - size
                if left:
                    self._in_flight[who] = left
                else:
                    del self._in_flight[who]
