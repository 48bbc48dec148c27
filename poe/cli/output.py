"""How every `poe` command prints a result: one JSON document with `--json`, else text for people."""

from __future__ import annotations

import json
from collections.abc import Callable

from poe.engine.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

# Exit statuses of `poe`, one per class of failure, so that a script can tell a retryable outage from a
# typo. 1-3 keep their long-standing meanings; the error classes start at 4 so that none collides.
EXIT_OK = 0
EXIT_FAILURE = 1  # any other error; also `registry migrate --status` (needs migrating), `registry gc` (removal failed)
EXIT_USAGE = 2  # argparse's own: unknown flag, missing argument, bad value for a flag's type
EXIT_FSCK_PROBLEMS = 3  # `poe registry fsck` found corrupt, missing or orphan blobs
EXIT_INVALID_ARGUMENT = 4
EXIT_NOT_FOUND = 5
EXIT_CONFLICT = 6  # already exists, or a failed precondition (e.g. the schema needs `poe registry migrate`)
EXIT_UNAVAILABLE = 7  # unreachable (service, database, blob store), deadline exceeded or quota: retry later
EXIT_PERMISSION = 8  # permission denied or unauthenticated
EXIT_DATA_LOSS = 9  # stored bytes do not match their sha256
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)

# Keyed by the domain exception classes; a subclass (DataError is an InvalidArgument) takes its base's code.
EXIT_CODES: dict[type[Exception], int] = {
    InvalidArgument: EXIT_INVALID_ARGUMENT,
    NotFound: EXIT_NOT_FOUND,
    AlreadyExists: EXIT_CONFLICT,
    FailedPrecondition: EXIT_CONFLICT,
    Unavailable: EXIT_UNAVAILABLE,
    ResourceExhausted: EXIT_UNAVAILABLE,
    PermissionDenied: EXIT_PERMISSION,
    Unauthenticated: EXIT_PERMISSION,
    DataLoss: EXIT_DATA_LOSS,
}

# For `poe --help`.
EXIT_CODES_HELP = f"""exit status:
  {EXIT_OK}    success
  {EXIT_FAILURE}    any other error
  {EXIT_USAGE}    usage: unknown command or flag, missing or malformed argument
  {EXIT_FSCK_PROBLEMS}    `poe registry fsck` found problems
  {EXIT_INVALID_ARGUMENT}    invalid argument (bad classes, a bad file, a bad POE_* setting)
  {EXIT_NOT_FOUND}    not found (pool, version, alias, job, pool directory)
  {EXIT_CONFLICT}    already exists, or a failed precondition (e.g. the schema needs migrating)
  {EXIT_UNAVAILABLE}    unavailable, deadline exceeded or over a quota (service, database, blob store): retry later
  {EXIT_PERMISSION}    permission denied or unauthenticated
  {EXIT_DATA_LOSS}    data loss: stored bytes do not match their sha256
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)"""


def exit_code(error: BaseException) -> int:
    """The exit status for a failure: the code of its nearest class in EXIT_CODES, else EXIT_FAILURE."""
    for cls in type(error).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return EXIT_FAILURE


def emit(data, as_json: bool, text: Callable[[], str]) -> int:
    """Print `data` as JSON, or `text()`; returns the exit status 0."""
    print(json.dumps(data) if as_json else text())
    return 0


def table(rows: list[dict], as_json: bool, *, empty: str, header: str, line: Callable[[dict], str]) -> int:
    """Print `rows` as a JSON list, or as a header and one line a row (`empty` when there are none)."""
    if as_json or not rows:
        return emit(rows, as_json, lambda: empty)
    print(header)
    for row in rows:
        print(line(row))
    return 0
