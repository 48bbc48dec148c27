"""`pool.json`, the manifest of a pool directory, read without torch (the SDK imports a pool with it)."""

from __future__ import annotations

import json
from pathlib import Path

from poe.engine.errors import InvalidArgument, NotFound

FORMAT = "poe.pool/v1"
MANIFEST = "pool.json"


def read_manifest(directory: str | Path) -> dict:
    """The manifest of the pool in `directory`: NotFound without one, InvalidArgument when it is not
    JSON or names another format."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise NotFound(f"{directory}: not a pool directory (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"{path}: invalid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise InvalidArgument(f"{path}: unsupported format {found!r} (expected {FORMAT})")
    return manifest
