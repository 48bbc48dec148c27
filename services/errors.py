"""Server half of the error mapping: domain exceptions raised by any handler become status codes.

Servers install `ErrorInterceptor`; servicers simply raise `poe.engine.errors` exceptions, whose
`code` attribute names the status:

    InvalidArgument -> INVALID_ARGUMENT     NotFound -> NOT_FOUND
    AlreadyExists -> ALREADY_EXISTS         FailedPrecondition -> FAILED_PRECONDITION
    Unavailable -> UNAVAILABLE              DataLoss -> DATA_LOSS
    Cancelled -> CANCELLED                  anything else -> INTERNAL, generic message, logged traceback

A plain `PoeError` (code INTERNAL) keeps its message, which is written for users; any other
exception is reported as "internal error" so that no stack detail leaks to clients. An error built
with `field_error("pool", "...")` names the offending request field in its message and in the
trailing metadata key `poe-field`. The client half (`poe.client.errors`) turns statuses back into
the same exceptions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from poe.client.errors import FIELD_METADATA_KEY, error_from_rpc
from poe.engine.errors import PoeError

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error (details in the server log)"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Status code and client-facing message for an exception raised by a handler."""
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        exc = error_from_rpc(exc)  # a downstream service's error passes through with its code
    if isinstance(exc, PoeError):
        return grpc.StatusCode[exc.code], str(exc) or type(exc).__name__
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def _abort(context: grpc.ServicerContext, exc: Exception, method: str) -> None:
    """Turn `exc` into the RPC's status; always raises (context.abort does)."""
    code_set = context.code()
    if code_set is not None and code_set != grpc.StatusCode.OK:
        raise exc  # the handler already called context.abort()
    if not context.is_active():
        log.debug("%s: client went away (%s)", method, exc)
        context.abort(grpc.StatusCode.CANCELLED, "cancelled by the client")
    code, message = status_of(exc)
    if code == grpc.StatusCode.INTERNAL and not isinstance(exc, PoeError):
        log.error("unexpected error in %s", method, exc_info=exc)
    elif code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNAVAILABLE):
        log.warning("%s: %s: %s", method, code.name, message)
    else:
        log.debug("%s: %s: %s", method, code.name, message)
    field = getattr(exc, "field", None)
    if field:
        context.set_trailing_metadata(((FIELD_METADATA_KEY, str(field)),))
    context.abort(code, message)


def _wrap_unary_response(behavior: Callable, method: str) -> Callable:
    def handler(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request_or_iterator, context)
        except Exception as e:
            _abort(context, e, method)

    return handler


def _wrap_stream_response(behavior: Callable, method: str) -> Callable:
    # The response iterator itself is wrapped: errors raised while streaming (after the handler
    # returned its generator) are mapped as well.
    def handler(request_or_iterator: Any, context: grpc.ServicerContext) -> Iterator:
        try:
            yield from behavior(request_or_iterator, context)
        except Exception as e:
            _abort(context, e, method)

    return handler


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps domain exceptions raised by any handler (unary or streaming) to status codes."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary_response(handler.unary_unary, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=_wrap_unary_response(handler.stream_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=_wrap_stream_response(handler.unary_stream, method))
        if handler.stream_stream:
            return handler._replace(stream_stream=_wrap_stream_response(handler.stream_stream, method))
        return handler
