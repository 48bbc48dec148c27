"""The base of the typed gRPC clients: one channel, deadlines, retries and error translation.

A subclass names its service, its stub, the `poe.engine.config.Settings` field with its default
address, its default deadline and the methods that may be retried; its methods call `_call`
(unary or client-streaming) and `_stream` (server-streaming), which raise `poe.engine.errors`
exceptions instead of grpc.RpcError.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import grpc
import grpc.experimental  # ChannelOptions (not imported by `import grpc`)
from google.protobuf.descriptor import ServiceDescriptor

from poe.client.errors import translate_rpc_errors
from poe.engine.config import LB_POLICIES, Secret, Settings, is_loopback, settings, split_host
from poe.engine.errors import InvalidArgument, Unavailable

MAX_MESSAGE_BYTES = 8 << 20  # models and blobs are streamed in 1 MiB chunks; this leaves headroom
MAX_ATTEMPTS = 5  # gRPC treats a retryPolicy's maxAttempts above 5 as 5


ADMIN_TOKEN_FILE = "admin.token"


def resolve_token(token: str | Secret | None, target: str) -> str:
    """The bearer token a client sends: `token`, else POE_TOKEN, else (to a loopback target only)
    the admin token `poe up` wrote into POE_HOME; "" for none. The local admin token never goes to
    another machine: it is only valid for this machine's server anyway."""
    if isinstance(token, Secret):
        token = token.reveal()
    if token:
        return token.strip()
    cfg = settings()
    if cfg.token:
        return cfg.token.reveal().strip()
    if is_loopback(split_host(target)):
        try:
            return (cfg.home / ADMIN_TOKEN_FILE).read_text().strip()
        except OSError:
            return ""
    return ""


def read_tls_files(ca: Path | None, cert: Path | None, key: Path | None,
                   names: tuple[str, str, str]) -> tuple[bytes | None, bytes | None, bytes | None]:
    """The PEM bytes of a CA bundle and of a certificate chain with its private key, each optional.

    Checked here with Python's ssl (OpenSSL), so that a wrong file is refused when a client or
    server is built, with the name of its setting (`names`: the CA's, the certificate's, the key's),
    instead of failing every handshake later. An encrypted key is refused: nobody would type its
    password into a service."""
    ca_name, cert_name, key_name = names
    if (cert is None) != (key is None):
        given, missing = (cert_name, key_name) if cert is not None else (key_name, cert_name)
        raise InvalidArgument(f"{given} is set but {missing} is not: set both or neither")
    ca_pem, cert_pem, key_pem = (_read_file(path, name) for path, name in
                                 ((ca, ca_name), (cert, cert_name), (key, key_name)))
    if ca is not None:
        _check_certificates(ca, f"{ca_name}: {ca} holds no PEM certificate")
    if cert is not None:
        _check_certificates(cert, f"{cert_name}: {cert} holds no PEM certificate")

        def encrypted() -> bytes:
            raise InvalidArgument(f"{key_name}: {key} is encrypted; give the key unencrypted (keep the file private)")

        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password=encrypted)
        except ssl.SSLError:
            raise InvalidArgument(f"{key_name}: {key} is not a PEM private key of the certificate in {cert} "
                                  f"({cert_name})") from None
    return ca_pem, cert_pem, key_pem


def _read_file(path: Path | None, name: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InvalidArgument(f"{name}: cannot read {path}: {e.strerror or e}") from None


def _check_certificates(path: Path, message: str) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError:
        raise InvalidArgument(message) from None


CLIENT_TLS_SETTINGS = ("POE_TLS_CA", "POE_TLS_CERT", "POE_TLS_KEY")


@dataclass(frozen=True)
class ClientTLS:
    """TLS of a client's channel: the CA bundle the server's certificate is checked against (None:
    the system's roots), the client's own certificate and key for mutual TLS, and the name the
    server's certificate must hold (empty: the target's host)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str = ""

    @classmethod
    def from_settings(cls, cfg: Settings) -> ClientTLS | None:
        """TLS as POE_TLS_CA, POE_TLS_CERT, POE_TLS_KEY and POE_TLS_SERVER_NAME set it; None
        (plaintext) without POE_TLS_CA."""
        if cfg.tls_ca is None:
            if cfg.tls_cert is not None or cfg.tls_key is not None:
                # Sending a client certificate but not checking the server would be a false sense of safety.
                raise InvalidArgument("POE_TLS_CERT and POE_TLS_KEY need POE_TLS_CA: the CA bundle that the "
                                      "server's certificate is checked against")
            return None
        return cls(cfg.tls_ca, cfg.tls_cert, cfg.tls_key, cfg.tls_server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        ca, cert, key = read_tls_files(self.ca, self.cert, self.key, CLIENT_TLS_SETTINGS)
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def is_local_target(target: str) -> bool:
    """A target on this machine: a loopback address, localhost or a Unix socket."""
    return target.startswith(("unix:", "unix-abstract:")) or is_loopback(split_host(target))


class GrpcClient:
    """A client of one `poe.v1` service over one channel.

    Deadlines: every call carries one (`timeout` seconds, the client's default unless the method
    is given another); a deadline covers the call's retries too.

    Retries are gRPC's own, configured in the channel's service config (`grpc.service_config`,
    `grpc.enable_retries`): a call that fails with UNAVAILABLE is attempted again up to `retries`
    times (at most 4), after an exponential, jittered backoff from 0.1 s to 2 s, and a streamed
    response only while none of its messages has arrived. `retryThrottling` stops retrying on a
    channel whose calls mostly fail (a server that is down is not hammered by every client).
    Only the methods a subclass lists in `RETRYABLE` are retried, by method name: reads, and
    ComposeModel (the same request composes the same bytes). Writes are not: a write whose answer
    was lost may have been applied, and doing it again may act twice or fail where the first call
    succeeded (DeletePoolAlias, CreateExtractionJob, StartExtraction...); client-streaming uploads
    would have to be buffered to be replayed. Callers that want a write retried decide it
    themselves. With `channel=`, the given channel is used as it is (its own options and service
    config apply) and `close` leaves it open.

    Load balancing: `lb_policy` (default POE_LB_POLICY, else pick_first) decides how the channel
    spreads calls over the addresses its target resolves to: pick_first keeps one connection to the
    first that answers; round_robin connects to all of them and sends each call to the next, which
    is what a target like `dns:///poe-composer-headless.poe.svc:50051` (a headless Service: one
    address per ready pod) needs so that every replica gets calls. Either way the channel resolves
    the name again when a server closes the connection (servers close connections after
    POE_MAX_CONNECTION_AGE), and so finds replicas added since.

    TLS: on when POE_TLS_CA is set (in `config`, else in the environment): the server's certificate
    is checked against that CA bundle and must name the target's host, or POE_TLS_SERVER_NAME;
    POE_TLS_CERT and POE_TLS_KEY add the client's certificate for servers that require one (mutual
    TLS). `tls=` decides instead: a ClientTLS, True (the configured CA, else the system's roots) or
    False (plaintext). `self.tls` says whether the channel is encrypted (with `channel=`: what `tls`
    says about it).
    """

    SERVICE: ClassVar[ServiceDescriptor]
    STUB: ClassVar[Callable[[grpc.Channel], Any]]
    ADDRESS_SETTING: ClassVar[str]  # the Settings field with the default target
    DEFAULT_TIMEOUT: ClassVar[float] = 60.0
    RETRYABLE: ClassVar[tuple[str, ...]] = ()
    # Blocking channels read server streams on the calling thread, not on a thread gRPC starts
    # for each call when the channel has none running (about 1 ms of CPU a call here). Only for
    # short streams: a long watch should stay interruptible with Ctrl-C.
    SINGLE_THREADED_STREAMS: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        unknown = sorted(set(cls.RETRYABLE) - set(cls.SERVICE.methods_by_name))
        if unknown:
            raise TypeError(f"{cls.__name__}.RETRYABLE: {cls.SERVICE.full_name} has no method {', '.join(unknown)}")

    def __init__(self, target: str | None = None, *, channel: grpc.Channel | None = None,
                 timeout: float | None = None, retries: int = MAX_ATTEMPTS - 1, token: str | Secret | None = None,
                 tls: ClientTLS | bool | None = None, config: Settings | None = None, lb_policy: str | None = None):
        if target is None and channel is None:
            target = getattr(config or settings(), self.ADDRESS_SETTING)
        self.target = target or "<channel>"
        token = resolve_token(token, self.target)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.timeout = self.DEFAULT_TIMEOUT if timeout is None else timeout
        self._own_channel = channel is None
        if channel is None:
            channel, tls = self.open_channel(target, tls=tls, config=config, retries=retries, lb_policy=lb_policy)
        self.tls = bool(tls)  # with channel=: whether the caller says that channel is secure
        self.channel = channel
        self.stub = self.STUB(self.channel)
        self._what = f"{self.SERVICE.name.lower()} at {self.target}"

    @classmethod
    def open_channel(cls, target: str, *, tls: ClientTLS | bool | None = None, config: Settings | None = None,
                     retries: int = MAX_ATTEMPTS - 1, lb_policy: str | None = None,
                     api: Any = grpc) -> tuple[Any, bool]:
        """A new channel to `target` with this client's options (retries, load balancing) and TLS,
        and whether it is encrypted. `api` makes it: `grpc` a blocking channel, `grpc.aio` one for
        the asyncio clients (both take the same arguments)."""
        tls_config = cls._tls_config(tls, config)
        lb_policy = lb_policy or (config or settings()).lb_policy
        if lb_policy not in LB_POLICIES:
            raise InvalidArgument(f"lb_policy: expected one of {', '.join(LB_POLICIES)}, got {lb_policy!r}")
        options = cls.channel_options(retries, lb_policy)
        if api is grpc and cls.SINGLE_THREADED_STREAMS:
            options.append((grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1))
        if tls_config is None:
            return api.insecure_channel(target, options=options), False
        return api.secure_channel(target, tls_config.credentials(),
                                  options=options + tls_config.channel_options()), True

    @staticmethod
    def _tls_config(tls: ClientTLS | bool | None, config: Settings | None) -> ClientTLS | None:
        if isinstance(tls, ClientTLS) or tls is False:
            return tls or None
        configured = ClientTLS.from_settings(config or settings())
        if tls and configured is None:
            return ClientTLS()  # TLS without a configured CA: the system's roots
        return configured

    @classmethod
    def channel_options(cls, retries: int = MAX_ATTEMPTS - 1,
                        lb_policy: str = "pick_first") -> list[tuple[str, int | str]]:
        """Options of the channels this client makes: message sizes, retries, load balancing,
        reconnect backoff."""
        return [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.enable_retries", 1),
                ("grpc.service_config", json.dumps(cls.service_config(retries, lb_policy))),
                # A retry finds a restarted server only once the channel reconnects; gRPC's default
                # first reconnect waits 1 s, longer than the retries' backoff altogether.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 5000)]

    @classmethod
    def service_config(cls, retries: int = MAX_ATTEMPTS - 1, lb_policy: str = "pick_first") -> dict:
        """The channel's service config: the retry policy of the RETRYABLE methods (none for
        `retries` 0) and the load-balancing policy (gRPC's default, pick_first, goes unsaid)."""
        balancing = {} if lb_policy == "pick_first" else {"loadBalancingConfig": [{lb_policy: {}}]}
        attempts = min(retries + 1, MAX_ATTEMPTS)
        if attempts < 2 or not cls.RETRYABLE:
            return balancing
        return {
            **balancing,
            "methodConfig": [{
                "name": [{"service": cls.SERVICE.full_name, "method": m} for m in cls.RETRYABLE],
                "retryPolicy": {"maxAttempts": attempts, "initialBackoff": "0.1s", "maxBackoff": "2s",
                                "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
            }],
            # Retries stop while the channel's failures outnumber its successes (10 tokens, each
            # failure takes 1, each success gives back 0.1); see gRFC A6.
            "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
        }

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """The call metadata this client sends (its bearer token), for calls made on `stub` directly."""
        return self._metadata

    def close(self) -> None:
        if self._own_channel:
            self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects (Unavailable after `timeout` seconds)."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(f"{self._what}: not reachable within {timeout:.0f} s") from None

    # -- calls -------------------------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _call(self, method: Callable, request, timeout: float | None = None):
        """A unary or client-streaming call (`request` an iterator of messages for the latter)."""
        with translate_rpc_errors(self._what):
            return method(request, timeout=self._deadline(timeout), metadata=self._metadata)

    def _stream(self, method: Callable, request, timeout: float | None = None, *,
                unbounded: bool = False) -> Iterator:
        """The messages of a server-streaming call; stopping early cancels the call on the server
        too. `unbounded`: no deadline when `timeout` is None (a watch that may last for hours)."""
        call = method(request, timeout=timeout if unbounded else self._deadline(timeout), metadata=self._metadata)
        try:
            with translate_rpc_errors(self._what):
                yield from call
        finally:
            call.cancel()

    def _list(self, method: Callable, request_cls, items: str, **fields) -> Iterator:
        """Every item of a paginated List call: `request_cls(**fields)` page after page, the items
        in the response's repeated field `items`, until `next_page_token` is empty."""
        token = ""
        while True:
            resp = self._call(method, request_cls(page_token=token, **fields))
            yield from getattr(resp, items)
            token = resp.next_page_token
            if not token:
                return
