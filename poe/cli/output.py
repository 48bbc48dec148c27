"""How every `poe` command prints a result: one JSON document with `--json`, else text for people."""

from __future__ import annotations

import json
from collections.abc import Callable


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
