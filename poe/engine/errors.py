"""Domain errors shared by the core library and the services.

Each class names the gRPC status it maps to; the services translate them in one interceptor
(`poe_services.errors`), the CLI prints the message on one line and exits with the status of
the class (`poe.cli.output.EXIT_CODES`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class PoeError(Exception):
    """Base class: a failure with a message meant for the user."""

    code = "INTERNAL"


class InvalidArgument(PoeError, ValueError):
    code = "INVALID_ARGUMENT"


class DataError(InvalidArgument):
    """A data set file is missing, truncated or malformed."""


class NotFound(PoeError, LookupError):
    code = "NOT_FOUND"


class AlreadyExists(PoeError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(PoeError):
    code = "FAILED_PRECONDITION"


class Unavailable(PoeError):
    code = "UNAVAILABLE"


class PermissionDenied(PoeError):  # the caller is known but may not do this
    code = "PERMISSION_DENIED"


class Unauthenticated(PoeError):  # the caller's credentials are missing or not valid
    code = "UNAUTHENTICATED"


class ResourceExhausted(PoeError):  # a quota or a capacity limit: retry later, or with less
    code = "RESOURCE_EXHAUSTED"


class DataLoss(PoeError):
    """Stored bytes do not match their recorded sha256."""

    code = "DATA_LOSS"


class Cancelled(PoeError):
    code = "CANCELLED"


def field_error(field: str, reason: str) -> InvalidArgument:
    """An InvalidArgument whose message starts with the request field it is about."""
    err = InvalidArgument(f"{field}: {reason}")
    err.field = field  # type: ignore[attr-defined]
    return err


@contextmanager
def within(field: str) -> Iterator[None]:
    """InvalidArgument raised inside names `field` first: `models[2]` turns "sha256: ..." into
    "models[2].sha256: ..." (and a message without a field into "models[2]: ...")."""
    try:
        yield
    except InvalidArgument as err:
        inner, message = getattr(err, "field", ""), str(err)
        if inner and message.startswith(f"{inner}: "):
            raise field_error(f"{field}.{inner}", message[len(inner) + 2:]) from None
        raise field_error(field, message) from None
