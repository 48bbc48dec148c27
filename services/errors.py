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

Bytes that do not parse as the method's request message are INVALID_ARGUMENT too (gRPC itself
would answer INTERNAL): the interceptor swaps in a deserializer that never raises, and the wrapped
handler refuses what it could not parse, for streamed requests message by message. Messages are
cut to `MAX_STATUS_MESSAGE_BYTES` as sent, so that an error quoting client input always fits the
client's metadata limit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from poe.client.errors import FIELD_METADATA_KEY, error_from_rpc
from poe.engine.errors import PoeError, field_error

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error (details in the server log)"
# A status message travels percent-encoded in the trailing metadata, which clients cap at 8 KiB by
# default (a longer one fails the call on the client's side). Bytes as sent, after encoding.
MAX_STATUS_MESSAGE_BYTES = 2048


def _sent_bytes(char: str) -> int:
    """Bytes `char` takes in the grpc-message header (printable ASCII but '%' as is, else %XX per byte)."""
    return sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in char.encode())


def shorten_message(message: str, limit: int = MAX_STATUS_MESSAGE_BYTES) -> str:
    """`message`, cut so that it takes at most `limit` bytes as sent; a cut one says so."""
    # gRPC sends UTF-8: a lone surrogate (a file name read with surrogateescape) is shown escaped.
    message = message.encode("utf-8", "backslashreplace").decode()
    if len(message) * 12 <= limit or sum(map(_sent_bytes, message)) <= limit:  # 12: a 4-byte character, %XX each
        return message
    suffix = f"... ({len(message)} characters in all)"
    budget, end = limit - len(suffix), 0
    while end < len(message) and budget >= _sent_bytes(message[end]):
        budget -= _sent_bytes(message[end])
        end += 1
    return message[:end] + suffix


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Status code and client-facing message for an exception raised by a handler."""
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        exc = error_from_rpc(exc)  # a downstream service's error passes through with its code
    if isinstance(exc, PoeError):
        return grpc.StatusCode[exc.code], shorten_message(str(exc) or type(exc).__name__)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


class Undecodable:
    """What the lenient deserializer returns for bytes that are not a valid request message."""

    def __init__(self, message_type: str):
        self.message_type = message_type

    def error(self) -> Exception:
        return field_error("request", f"not a valid {self.message_type} message")


def lenient_deserializer(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer`, returning an Undecodable instead of raising on bytes it cannot parse."""
    if deserializer is None:
        return None
    message_class = getattr(deserializer, "__self__", None)  # a generated message's FromString
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    undecodable = Undecodable(getattr(descriptor, "full_name", "request"))

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return undecodable

    return deserialize


def _checked_requests(requests: Iterator) -> Iterator:
    """The items of a request stream; the first one that did not parse ends it with InvalidArgument."""
    for request in requests:
        if isinstance(request, Undecodable):
            raise request.error()
        yield request


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


def _checked(request_or_iterator: Any, request_streaming: bool) -> Any:
    if request_streaming:
        return _checked_requests(request_or_iterator)
    if isinstance(request_or_iterator, Undecodable):
        raise request_or_iterator.error()
    return request_or_iterator


def _wrap_unary_response(behavior: Callable, method: str, request_streaming: bool) -> Callable:
    def handler(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(_checked(request_or_iterator, request_streaming), context)
        except Exception as e:
            _abort(context, e, method)

    return handler


def _wrap_stream_response(behavior: Callable, method: str, request_streaming: bool) -> Callable:
    # The response iterator itself is wrapped: errors raised while streaming (after the handler
    # returned its generator) are mapped as well.
    def handler(request_or_iterator: Any, context: grpc.ServicerContext) -> Iterator:
        try:
            yield from behavior(_checked(request_or_iterator, request_streaming), context)
        except Exception as e:
            _abort(context, e, method)

    return handler


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps domain exceptions raised by any handler (unary or streaming) to status codes, and
    requests that do not parse to INVALID_ARGUMENT. The interceptors outside it keep the handler's
    request_deserializer when they wrap it again, so the lenient one set here is the one gRPC uses."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        streaming = handler.request_streaming
        for attr in ("unary_unary", "stream_unary", "unary_stream", "stream_stream"):
            behavior = getattr(handler, attr)
            if behavior is not None:
                wrap = _wrap_stream_response if handler.response_streaming else _wrap_unary_response
                return handler._replace(**{attr: wrap(behavior, method, streaming)},
                                        request_deserializer=lenient_deserializer(handler.request_deserializer))
        return handler
