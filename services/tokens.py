"""Bearer tokens: the token file the servers check callers against, and `poe token create|list|revoke`.

A token is `poe_<id>_<secret>`. The file (JSON, mode 0600) keeps only each token's sha256 with
its id, name, role, creation, expiry and revocation times, never the token itself:

    {"tokens": [{"id": "k3x9a2", "name": "ci", "role": "publisher", "sha256": "<hex>",
                 "created": "2026-12-01T17:00:00Z", "expires": null, "revoked": null}]}

The servers find an entry by the id in the presented token and compare sha256 digests in constant
time. They re-read the file when it changes (a revoke, or a Kubernetes Secret update, takes effect
within a second or two). Secrets are 32 random bytes, so one sha256 is enough: there is nothing
to guess that a slow hash would protect.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from poe.client.base import ADMIN_TOKEN_FILE
from poe.engine.config import ROLES, Settings
from poe.engine.errors import DataLoss, InvalidArgument, NotFound, field_error

TOKEN = re.compile(r"poe_(?P<id>[a-z0-9-]{1,40})_(?P<secret>[A-Za-z0-9]{20,200})")
TOKEN_ID = re.compile(r"[a-z0-9-]{1,40}")
TOKEN_NAME = re.compile(r"[\w .@:/-]{1,100}")
MAX_TOKEN_FILE_BYTES = 4 << 20
# How often a server looks at the token file's modification time and size.
RELOAD_INTERVAL = 1.0


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _iso(t: datetime | None) -> str | None:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ") if t else None


def _parse_time(value, where: str) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except (TypeError, ValueError):
        raise DataLoss(f"{where}: expected a time like 2026-12-01T17:00:00Z, got {value!r}") from None


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenEntry:
    id: str
    name: str
    role: str
    sha256: str
    created: datetime
    expires: datetime | None = None
    revoked: datetime | None = None

    def state(self, now: datetime | None = None) -> str:
        now = now or _now()
        if self.revoked:
            return "revoked"
        if self.expires and self.expires <= now:
            return "expired"
        return "active"

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("created", "expires", "revoked"):
            d[key] = _iso(d[key])
        return d

    @classmethod
    def from_dict(cls, data, where: str) -> TokenEntry:
        if not isinstance(data, dict):
            raise DataLoss(f"{where}: expected an object")
        try:
            entry = cls(id=data["id"], name=data.get("name") or data["id"], role=data["role"], sha256=data["sha256"],
                        created=_parse_time(data.get("created"), f"{where}.created") or _now(),
                        expires=_parse_time(data.get("expires"), f"{where}.expires"),
                        revoked=_parse_time(data.get("revoked"), f"{where}.revoked"))
        except KeyError as e:
            raise DataLoss(f"{where}: missing {e.args[0]!r}") from None
        if not (isinstance(entry.id, str) and TOKEN_ID.fullmatch(entry.id)):
            raise DataLoss(f"{where}: bad id {entry.id!r}")
        if entry.role not in ROLES:
            raise DataLoss(f"{where}: unknown role {entry.role!r} (expected one of {', '.join(ROLES)})")
        if not (isinstance(entry.sha256, str) and re.fullmatch(r"[0-9a-f]{64}", entry.sha256)):
            raise DataLoss(f"{where}: sha256 must be 64 lowercase hex digits")
        return entry


def parse_token_file(text: str, where: str) -> dict[str, TokenEntry]:
    """The entries of a token file by id; DataLoss naming `where` when it is malformed."""
    try:
        data = json.loads(text) if text.strip() else {"tokens": []}
    except json.JSONDecodeError as e:
        raise DataLoss(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None
    items = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise DataLoss(f"{where}: expected {{\"tokens\": [...]}}")
    entries: dict[str, TokenEntry] = {}
    for i, item in enumerate(items):
        entry = TokenEntry.from_dict(item, f"{where}: tokens[{i}]")
        if entry.id in entries:
            raise DataLoss(f"{where}: token id {entry.id!r} appears twice")
        entries[entry.id] = entry
    return entries


def _read(path: Path) -> dict[str, TokenEntry]:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TOKEN_FILE_BYTES + 1)
    except FileNotFoundError:
        return {}
    if len(raw) > MAX_TOKEN_FILE_BYTES:
        raise DataLoss(f"{path}: larger than {MAX_TOKEN_FILE_BYTES} bytes")
    return parse_token_file(raw.decode("utf-8", "replace"), str(path))


def _write(path: Path, entries: dict[str, TokenEntry]) -> None:
    """Replace the file atomically, readable and writable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"tokens": [e.to_dict() for e in entries.values()]}, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".tokens-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def _locked(path: Path) -> Iterator[dict[str, TokenEntry]]:
    """The file's entries under an exclusive lock (concurrent `poe token` commands); written back on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = _read(path)
        yield entries
        _write(path, entries)


def new_token(token_id: str | None = None) -> tuple[str, str]:
    """(id, token string) with a fresh random secret."""
    token_id = token_id or secrets.token_hex(4)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    return token_id, f"poe_{token_id}_{''.join(secrets.choice(alphabet) for _ in range(43))}"


def create(path: Path, role: str, name: str = "", ttl: timedelta | None = None,
           token_id: str | None = None) -> tuple[TokenEntry, str]:
    """Add a token to the file; returns its entry and the token (shown once, never stored)."""
    if role not in ROLES:
        raise field_error("role", f"expected one of {', '.join(ROLES)}, got {role!r}")
    if token_id is not None and not TOKEN_ID.fullmatch(token_id):
        raise field_error("id", "1 to 40 of a-z, 0-9 and -")
    if name and not TOKEN_NAME.fullmatch(name):
        raise field_error("name", "1 to 100 letters, digits, spaces or . @ : / - _")
    if ttl is not None and ttl.total_seconds() <= 0:
        raise field_error("expires", "must be in the future")
    with _locked(path) as entries:
        while True:
            tid, token = new_token(token_id)
            if tid not in entries:
                break
            if token_id is not None:
                raise InvalidArgument(f"id: a token with id {token_id!r} exists already")
        now = _now()
        entry = TokenEntry(tid, name or tid, role, digest(token), now, now + ttl if ttl else None)
        entries[tid] = entry
    return entry, token


def revoke(path: Path, token_id: str) -> TokenEntry:
    """Mark a token revoked (kept in the file so that `list` shows it)."""
    with _locked(path) as entries:
        entry = entries.get(token_id)
        if entry is None:
            raise NotFound(f"no token with id {token_id!r} in {path}")
        if not entry.revoked:
            entry = entries[token_id] = TokenEntry(**{**asdict(entry), "revoked": _now()})
    return entry


def list_tokens(path: Path) -> list[TokenEntry]:
    return list(_read(path).values())


def bootstrap_admin_token(settings: Settings) -> Path | None:
    """On the first `poe up` (no token file yet): an admin token, its hash in the token file and the
    token itself in POE_HOME/admin.token, both readable by their owner only. Returns the token's
    path when it was written, None when a token file exists already."""
    path = settings.tokens_file
    if path is None or path.exists():
        return None
    _, token = create(path, "admin", "poe up local admin", token_id="local-admin")
    target = settings.home / ADMIN_TOKEN_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return target


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token's id, name and role, or the anonymous caller."""

    id: str
    name: str
    role: str

    @property
    def anonymous(self) -> bool:
        return self.id == ""


class TokenVerifier:
    """Checks presented tokens against a token file (re-read when it changes) and against tokens
    known only in memory (the service token `poe up` makes for its own services)."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[str, TokenEntry] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._memory: dict[str, TokenEntry] = {}
        self._reload(force=True)

    def add_memory_token(self, role: str, name: str) -> str:
        """A token valid for this process's lifetime only; returns it."""
        tid, token = new_token(f"mem-{secrets.token_hex(4)}")
        self._memory[tid] = TokenEntry(tid, name, role, digest(token), _now())
        return token

    def _reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < RELOAD_INTERVAL:
            return
        with self._lock:
            self._checked = now
            if self.path is None:
                return
            try:
                st = self.path.stat()
                stamp = (st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                self._entries, self._stamp = {}, None
                return
            if stamp == self._stamp:
                return
            try:
                self._entries = _read(self.path)
            except DataLoss:
                # A half-written or broken file must not lock everyone out, nor let anyone in
                # who was revoked: keep the last good entries when there were some; none at start.
                if self._stamp is None:
                    raise
                return
            self._stamp = stamp

    def verify(self, token: str) -> Principal | None:
        """The principal of a valid, unexpired, unrevoked token; None otherwise."""
        m = TOKEN.fullmatch(token)
        if not m:
            return None
        self._reload()
        entry = self._memory.get(m["id"]) or self._entries.get(m["id"])
        if entry is None:
            # A token created a moment ago works at once (the file is only re-read when it changed).
            self._reload(force=True)
            entry = self._entries.get(m["id"])
        if entry is None or not hmac.compare_digest(entry.sha256, digest(token)):
            return None
        if entry.state() != "active":
            return None
        return Principal(entry.id, entry.name, entry.role)
