"""Client half of the error mapping: a failed call becomes the `poe.engine.errors` exception
the server raised (the server half is `poe_services.errors`; each exception class names its code).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from poe.engine.errors import (
    AlreadyExists,
    Cancelled,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PoeError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

# Trailing metadata key naming the request field an INVALID_ARGUMENT is about.
FIELD_METADATA_KEY = "poe-field"

_FROM_CODE: dict[grpc.StatusCode, type[PoeError]] = {
    grpc.StatusCode[cls.code]: cls
    for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, Unavailable, DataLoss, Cancelled,
                PermissionDenied, Unauthenticated, ResourceExhausted)
}
_FROM_CODE[grpc.StatusCode.OUT_OF_RANGE] = InvalidArgument
_FROM_CODE[grpc.StatusCode.DEADLINE_EXCEEDED] = Unavailable

# The errors that carry a status: a blocking call's, and the asyncio API's (not a grpc.Call, same methods).
_STATUS_ERRORS = (grpc.Call, grpc.aio.AioRpcError)


def error_from_rpc(e: grpc.RpcError, what: str | None = None) -> PoeError:
    """The domain exception for a failed call (`what` prefixes the message, e.g. the target)."""
    has_status = isinstance(e, _STATUS_ERRORS)
    code = e.code() if has_status else None
    details = (e.details() if has_status else None) or str(e)
    cls = _FROM_CODE.get(code, PoeError)  # type: ignore[arg-type]
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        details = f"deadline exceeded ({details})"
    message = f"{what}: {details}" if what and cls is Unavailable else details
    err = cls(message)
    if has_status:
        for key, value in e.trailing_metadata() or ():
            if key == FIELD_METADATA_KEY:
                err.field = value  # type: ignore[attr-defined]
    err.grpc_code = code  # type: ignore[attr-defined]
    return err


@contextmanager
def translate_rpc_errors(what: str | None = None) -> Iterator[None]:
    """Re-raise `grpc.RpcError` inside the block as the matching `poe.engine.errors` exception."""
    try:
        yield
    except grpc.RpcError as e:
        raise error_from_rpc(e, what) from None
