"""The error interceptor on a real server: unary and streaming handlers, both directions."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
import pytest

from poe.client.errors import error_from_rpc, translate_rpc_errors
from poe.engine import errors
from poe.engine.errors import field_error
from poe_services.errors import INTERNAL_MESSAGE, ErrorInterceptor

CASES = [
    (errors.InvalidArgument("bad"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.DataError("truncated file"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound("nope"), grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists("twice"), grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition("not yet"), grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unavailable("db down"), grpc.StatusCode.UNAVAILABLE),
    (errors.DataLoss("bad bytes"), grpc.StatusCode.DATA_LOSS),
    (errors.PermissionDenied("not yours"), grpc.StatusCode.PERMISSION_DENIED),
    (errors.Unauthenticated("no token"), grpc.StatusCode.UNAUTHENTICATED),
    (errors.Cancelled("stop"), grpc.StatusCode.CANCELLED),
    (errors.PoeError("a message for users"), grpc.StatusCode.INTERNAL),
]
_raise = {"exc": None}


def _boom():
    raise _raise["exc"]


def unary(request, context):
    _boom()


def server_stream(request, context):
    yield b"first"
    _boom()


def client_stream(request_iterator, context):
    for _ in request_iterator:
        pass
    _boom()


def bidi(request_iterator, context):
    yield from request_iterator
    _boom()


def aborting(request, context):
    context.abort(grpc.StatusCode.PERMISSION_DENIED, "handler chose this")


@pytest.fixture(scope="module")
def channel():
    ident = dict(request_deserializer=None, response_serializer=None)
    handler = grpc.method_handlers_generic_handler("test.Errors", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, **ident),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, **ident),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream, **ident),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi, **ident),
        "Abort": grpc.unary_unary_rpc_method_handler(aborting, **ident),
    })
    server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[ErrorInterceptor()])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield ch
    ch.close()
    server.stop(None)


def _calls(ch):
    return {
        "unary": lambda: ch.unary_unary("/test.Errors/Unary")(b"x", timeout=5),
        "server_stream": lambda: list(ch.unary_stream("/test.Errors/ServerStream")(b"x", timeout=5)),
        "client_stream": lambda: ch.stream_unary("/test.Errors/ClientStream")(iter([b"a", b"b"]), timeout=5),
        "bidi": lambda: list(ch.stream_stream("/test.Errors/Bidi")(iter([b"a"]), timeout=5)),
    }


@pytest.mark.parametrize("exc, code", CASES, ids=[type(e).__name__ for e, _ in CASES])
def test_domain_errors_map_to_codes_for_every_handler_kind(channel, exc, code):
    _raise["exc"] = exc
    for kind, call in _calls(channel).items():
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == code, kind
        assert info.value.details() == str(exc), kind
        back = error_from_rpc(info.value)  # clients get the class that names the code back
        assert back.code == code.name and str(back) == str(exc), kind


def test_unexpected_error_is_internal_generic_and_logged(channel, caplog):
    _raise["exc"] = KeyError("secret-table-name")
    with caplog.at_level(logging.ERROR, logger="poe_services.errors"):
        for kind, call in _calls(channel).items():
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.INTERNAL, kind
            assert info.value.details() == INTERNAL_MESSAGE and "secret" not in info.value.details()
    records = [r for r in caplog.records if r.exc_info]
    assert len(records) == 4 and "KeyError" in caplog.text and "secret-table-name" in caplog.text


def test_field_errors_travel_in_trailing_metadata(channel):
    _raise["exc"] = field_error("pool", "must be lower case")
    with pytest.raises(grpc.RpcError) as info:
        _calls(channel)["unary"]()
    assert info.value.details() == "pool: must be lower case"
    back = error_from_rpc(info.value)
    assert isinstance(back, errors.InvalidArgument) and back.field == "pool"


def test_handler_abort_is_left_alone(channel):
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/test.Errors/Abort")(b"x", timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details() == "handler chose this"


def test_client_translation_of_connection_failures():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(errors.Unavailable, match=f"registry at 127.0.0.1:{port}"):
            with translate_rpc_errors(f"registry at 127.0.0.1:{port}"):
                ch.unary_unary("/test.Errors/Unary")(b"x", timeout=2)
