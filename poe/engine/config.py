"""All configuration, read from `POE_*` environment variables, with the embedded defaults in code.

A command-line flag always wins over the variable: the CLI passes its flags as overrides to
`settings(**overrides)`. Typed values are read through `_int`, `_float`, `_bytes` and `_bool`, which
raise InvalidArgument naming the variable and the expected form; an empty value counts as unset.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

from poe.engine.errors import InvalidArgument

_BINARY_SUFFIXES = {"": 1, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
_SIZE = re.compile(r"(\d+)\s*(Ki|Mi|Gi)?B?")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


_EXTRACTOR_ID = re.compile(r"[a-z0-9]([a-z0-9._-]{0,62})?")
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/@:\s]*:)[^/@\s]*@")
_URL_FIELDS = ("database_url", "blob_url", "s3_endpoint")


class Secret:
    """A value that is never shown: repr() and str() print *** (so a Settings or an f-string in a
    log cannot leak it); `reveal()` gives the value to the one place that needs it."""

    __slots__ = ("_value",)

    def __init__(self, value: str = ""):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(Secret)


def redact_url(url: str) -> str:
    """`url` with any password replaced by *** (scheme://user:***@host/...), for messages and logs."""
    return _URL_PASSWORD.sub(lambda m: m.group("head") + "***@", url)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: a listener or a target only this machine reaches."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host(address: str) -> str:
    """The host part of host:port ([v6]:port and a dns:/// or ipv4: scheme included)."""
    for scheme in ("dns:///", "ipv4:", "ipv6:"):
        address = address.removeprefix(scheme)
    if address.startswith("["):
        return address[1:address.index("]")] if "]" in address else address
    return address.rsplit(":", 1)[0] if ":" in address else address


def _path(env: Mapping[str, str], name: str) -> Path | None:
    value = _raw(env, name)
    return Path(value).expanduser() if value is not None else None


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _raw(env, name)
    if value is None:
        return default
    if value.lower() not in choices:
        raise _bad(name, " or ".join(choices), value)
    return value.lower()


def _raw(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return value.strip() if value and value.strip() else None


def _bad(name: str, expected: str, value: str) -> InvalidArgument:
    return InvalidArgument(f"{name}: expected {expected}, got {value!r}")


def _extractor_id(env: Mapping[str, str]) -> str:
    value = _raw(env, "POE_EXTRACTOR_ID")
    if value is None:
        return ""
    if not _EXTRACTOR_ID.fullmatch(value):
        raise _bad("POE_EXTRACTOR_ID", "1-63 lower-case letters, digits, '.', '_' or '-' (such as a pod name)", value)
    return value


def _json_object(env: Mapping[str, str], name: str) -> str:
    """A JSON object, kept as its canonical text ("" when unset)."""
    value = _raw(env, name)
    if value is None:
        return ""
    try:
        data = json.loads(value)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise _bad(name, 'a JSON object such as {"env_vars": {"OMP_NUM_THREADS": "1"}}', value)
    return json.dumps(data, sort_keys=True)


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    """A whole number (negative allowed where the setting gives it a meaning)."""
    value = _raw(env, name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise _bad(name, f"a whole number such as {default}", value) from None


def _float(env: Mapping[str, str], name: str, default: float | None) -> float | None:
    """A finite number of seconds (all float settings are durations)."""
    value = _raw(env, name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise _bad(name, "a number of seconds such as 2.5", value)
    return number


def _count(env: Mapping[str, str], name: str, default: int) -> int:
    """A whole number >= 0."""
    value = _int(env, name, default)
    if value < 0:
        raise _bad(name, f"a whole number >= 0 such as {default}", str(value))
    return value


def _amount(env: Mapping[str, str], name: str, default: float) -> float:
    """A number of resources >= 0, fractions allowed (a task's CPUs or GPUs)."""
    value = _raw(env, name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise _bad(name, f"a number >= 0 such as {default:g} or 0.5", value)
    return number


def _bytes(env: Mapping[str, str], name: str, default: int) -> int:
    """A size: a whole number of bytes, or with a binary suffix Ki, Mi or Gi (512Mi = 536870912)."""
    value = _raw(env, name)
    if value is None:
        return default
    m = _SIZE.fullmatch(value)
    if not m:
        raise _bad(name, "a whole number of bytes such as 536870912 or 512Mi", value)
    return int(m.group(1)) * _BINARY_SUFFIXES[m.group(2) or ""]


def _list(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """Comma-separated names, lowercased (whoever reads the setting checks them)."""
    value = _raw(env, name)
    if value is None:
        return default
    return tuple(dict.fromkeys(v.strip().lower() for v in value.split(",") if v.strip()))


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = _raw(env, name)
    if value is None:
        return default
    if value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise _bad(name, "true or false (also 1/0, yes/no, on/off)", value)


def _default_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "poe"


def _default_pools_dir() -> Path:
    """The pools shipped in the source tree (pools/ beside the package)."""
    return Path(__file__).resolve().parents[2] / "pools"


ROLES = ("reader", "publisher", "admin", "service")
LB_POLICIES = ("pick_first", "round_robin")
# Who a caller without a token is: auto = reader while the server listens on loopback only, else nobody.
ANONYMOUS_ROLES = ("auto", "none", "reader", "publisher", "admin")


@dataclass(frozen=True, repr=False)
class Settings:
    home: Path
    data_dir: Path
    pools_dir: Path
    database_url: str
    blob_url: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: Secret
    s3_secure: bool
    registry_addr: str
    composer_addr: str
    extractor_addr: str
    device: str
    cache_bytes: int
    log_level: str
    # Registry: seconds between health probes of the database and blob store; migrate on start.
    registry_health_interval: float = 5.0
    registry_auto_migrate: bool = False
    s3_region: str = ""
    # S3 timeouts (seconds): TCP/TLS connect; waiting for the server's next bytes once a request is
    # sent; sending a request without progress (a slow link is fine, a stalled one is not).
    s3_connect_timeout: float = 3.0
    s3_read_timeout: float = 10.0
    s3_write_timeout: float = 10.0
    # Incomplete multipart uploads under the blob store's staging/: seconds between sweeps that abort
    # them (0: only at start-up and when the store comes back), and the age under which another
    # process's upload is left alone because it may still be in flight.
    s3_upload_sweep_interval: float = 3600.0
    s3_stale_upload_age: float = 3600.0
    # Composer: pool used when a request names none; bound of the in-memory composed-model cache;
    # how long an alias ("name" = name@latest) stays resolved; record compositions in the registry.
    default_pool: str = "fashion-mnist"
    model_cache_bytes: int = 256 * 1024 * 1024
    template_cache_bytes: int = 64 * 1024 * 1024  # archive templates (one per tensor layout)
    composer_threads: int = 1  # torch intra-op threads in a process hosting the composer (0: torch's own)
    alias_ttl: float = 5.0
    record_compositions: bool = True
    # Recordings waiting for the registry, at most (each holds its composed file); more are dropped and counted.
    record_queue: int = 256
    # Composer warm-up: seconds between looks at the registry's pools (new versions, moved aliases,
    # degraded pools); seconds after start past which the composer reports SERVING although warming
    # continues (once the registry has answered).
    composer_pool_poll: float = 10.0
    composer_ready_timeout: float = 60.0
    # Model formats whose templates warm-up makes for every pool version: the first before the
    # default pool counts as ready, the others right after, in the background (pt2 and onnx cost
    # about a second of CPU per tensor layout, torchscript a twentieth).
    composer_warm_formats: tuple[str, ...] = ("torchscript",)
    # Extractor: jobs driven at once; attempts of a Ray task whose worker process dies; seconds between
    # progress writes to the registry and between health probes.
    extractor_max_jobs: int = 1
    extractor_max_attempts: int = 3
    extractor_progress_interval: float = 2.0
    extractor_health_interval: float = 5.0
    # Extractor: the Ray cluster jobs train on ("": a local Ray started with the first job); Ray
    # workers per stage (shards of the sharded stages, experts at once; 0: the cluster's CPUs over
    # the CPUs per task); Ray resources per task (CPUs are also the task's torch threads; GPUs may
    # be fractions); the library KD's data-parallel workers on Ray Train, each with a task's
    # resources (0 or 1: one task).
    ray_address: str = ""
    ray_workers: int = 0
    ray_library_workers: int = 0
    # The runtime environment of the extractor's Ray job (a JSON object, `ray.init(runtime_env=...)`:
    # env_vars, pip, container, ...), for every task of every job; "": none.
    ray_runtime_env: str = ""
    ray_cpus_per_task: float = 1.0
    ray_gpus_per_task: float = 0.0
    # Shutdown: seconds a server keeps serving after turning NOT_SERVING, so that probes and balancers
    # see it before the port closes (None: the command's default, 5 for `poe serve`, 0 for `poe up`);
    # then seconds in-flight calls may take before they are cancelled.
    shutdown_drain: float | None = None
    shutdown_grace: float = 10.0
    # Load on a server, per hosted service: unary calls (and ComposeModel) at once, and streams that
    # stay open (watches, transfers, slow readers) at once; more are refused with RESOURCE_EXHAUSTED.
    # Seconds a response message may wait for a client that does not read before the call is
    # cancelled. Seconds after which a connection is closed (gracefully: its calls get the grace
    # period), so that clients connect again and find new replicas; 0: never.
    max_concurrent_calls: int = 64
    max_concurrent_streams: int = 64
    stream_write_timeout: float = 30.0
    max_connection_age: float = 300.0
    max_connection_age_grace: float = 30.0
    # Clients: how a channel spreads calls over the addresses its target resolves to (pick_first:
    # one connection; round_robin: every address, e.g. of a headless Service).
    lb_policy: str = "pick_first"
    # Authentication: the token file the servers check bearer tokens against (hashes only; reloaded
    # when it changes); the role of callers without a token; the token this process's clients send
    # (default for the CLI on a loopback target: POE_HOME/admin.token, written by `poe up`); the
    # token composer and extractor send to the registry.
    tokens_file: Path | None = None
    anonymous_role: str = "auto"
    token: Secret = Secret()
    service_token: Secret = Secret()
    # Bytes one caller may have in uploads that are not finished yet (staged blobs), at most.
    upload_quota_bytes: int = 2 * 1024**3
    # TLS for servers (gRPC and /metrics): certificate chain and key (PEM); with a client CA, clients
    # must present a certificate it signed (mutual TLS).
    tls_server_cert: Path | None = None
    tls_server_key: Path | None = None
    tls_client_ca: Path | None = None
    # TLS for clients: the CA bundle servers are verified with (turns TLS on); the client's own
    # certificate and key for mutual TLS; the name expected in the server's certificate (default:
    # the target's host).
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str = ""
    # Extractor: the only directory TorchScript oracles may be loaded from (files on the extractor,
    # named by path; loading one runs its code). None: no TorchScript oracle at all.
    extractor_oracle_dir: Path | None = None
    # Extractor: its name among the extractors that serve one registry. Every job records the name of
    # the extractor that started it, and an extractor resumes only the unfinished jobs of its name.
    extractor_id: str = ""

    def without_server_tls(self) -> Settings:
        """These settings for a server that a command starts on loopback only for itself."""
        return replace(self, tls_server_cert=None, tls_server_key=None, tls_client_ca=None)

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _URL_FIELDS and isinstance(value, str):
                value = redact_url(value)
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        home = Path(env.get("POE_HOME") or _default_home()).expanduser()
        return cls(
            home=home,
            data_dir=Path(env.get("POE_DATA_DIR") or "/usr/share/datasets/fashion-mnist").expanduser(),
            pools_dir=Path(env.get("POE_POOLS_DIR") or _default_pools_dir()).expanduser(),
            database_url=env.get("POE_DATABASE_URL") or f"sqlite:///{home / 'registry.sqlite3'}",
            blob_url=env.get("POE_BLOB_URL") or f"file://{home / 'blobs'}",
            s3_endpoint=env.get("POE_S3_ENDPOINT", "127.0.0.1:9000"),
            s3_access_key=env.get("POE_S3_ACCESS_KEY", ""),
            s3_secret_key=Secret(env.get("POE_S3_SECRET_KEY", "")),
            s3_secure=_bool(env, "POE_S3_SECURE", False),
            registry_addr=env.get("POE_REGISTRY_ADDR", "127.0.0.1:50051"),
            composer_addr=env.get("POE_COMPOSER_ADDR", "127.0.0.1:50051"),
            extractor_addr=env.get("POE_EXTRACTOR_ADDR", "127.0.0.1:50051"),
            device=env.get("POE_DEVICE", "auto"),
            cache_bytes=_bytes(env, "POE_CACHE_BYTES", 512 * 1024 * 1024),
            log_level=env.get("POE_LOG_LEVEL", "INFO"),
            registry_health_interval=_float(env, "POE_REGISTRY_HEALTH_INTERVAL", 5.0),
            registry_auto_migrate=_bool(env, "POE_REGISTRY_AUTO_MIGRATE", False),
            s3_region=env.get("POE_S3_REGION", ""),
            s3_connect_timeout=_float(env, "POE_S3_CONNECT_TIMEOUT", 3.0),
            s3_read_timeout=_float(env, "POE_S3_READ_TIMEOUT", 10.0),
            s3_write_timeout=_float(env, "POE_S3_WRITE_TIMEOUT", 10.0),
            s3_upload_sweep_interval=_float(env, "POE_S3_UPLOAD_SWEEP_INTERVAL", 3600.0),
            s3_stale_upload_age=_float(env, "POE_S3_STALE_UPLOAD_AGE", 3600.0),
            default_pool=env.get("POE_DEFAULT_POOL", "fashion-mnist"),
            model_cache_bytes=_bytes(env, "POE_MODEL_CACHE_BYTES", 256 * 1024 * 1024),
            template_cache_bytes=_bytes(env, "POE_TEMPLATE_CACHE_BYTES", 64 * 1024 * 1024),
            composer_threads=_int(env, "POE_COMPOSER_THREADS", 1),
            alias_ttl=_float(env, "POE_ALIAS_TTL", 5.0),
            record_compositions=_bool(env, "POE_RECORD_COMPOSITIONS", True),
            record_queue=_int(env, "POE_RECORD_QUEUE", 256),
            composer_pool_poll=_float(env, "POE_COMPOSER_POOL_POLL", 10.0),
            composer_ready_timeout=_float(env, "POE_COMPOSER_READY_TIMEOUT", 60.0),
            composer_warm_formats=_list(env, "POE_COMPOSER_WARM_FORMATS", ("torchscript",)),
            extractor_max_jobs=_int(env, "POE_EXTRACTOR_MAX_JOBS", 1),
            extractor_max_attempts=_int(env, "POE_EXTRACTOR_MAX_ATTEMPTS", 3),
            extractor_progress_interval=_float(env, "POE_EXTRACTOR_PROGRESS_INTERVAL", 2.0),
            extractor_health_interval=_float(env, "POE_EXTRACTOR_HEALTH_INTERVAL", 5.0),
            ray_address=_raw(env, "POE_RAY_ADDRESS") or "",
            ray_workers=_count(env, "POE_RAY_WORKERS", 0),
            ray_library_workers=_count(env, "POE_RAY_LIBRARY_WORKERS", 0),
            ray_runtime_env=_json_object(env, "POE_RAY_RUNTIME_ENV"),
            ray_cpus_per_task=_amount(env, "POE_RAY_CPUS_PER_TASK", 1.0),
            ray_gpus_per_task=_amount(env, "POE_RAY_GPUS_PER_TASK", 0.0),
            shutdown_drain=_float(env, "POE_SHUTDOWN_DRAIN", None),
            shutdown_grace=_float(env, "POE_SHUTDOWN_GRACE", 10.0),
            max_concurrent_calls=_int(env, "POE_MAX_CONCURRENT_CALLS", 64),
            max_concurrent_streams=_int(env, "POE_MAX_CONCURRENT_STREAMS", 64),
            stream_write_timeout=_float(env, "POE_STREAM_WRITE_TIMEOUT", 30.0),
            max_connection_age=_float(env, "POE_MAX_CONNECTION_AGE", 300.0),
            max_connection_age_grace=_float(env, "POE_MAX_CONNECTION_AGE_GRACE", 30.0),
            lb_policy=_choice(env, "POE_LB_POLICY", "pick_first", LB_POLICIES),
            tokens_file=_path(env, "POE_TOKENS_FILE") or home / "tokens.json",
            anonymous_role=_choice(env, "POE_ANONYMOUS_ROLE", "auto", ANONYMOUS_ROLES),
            token=Secret(_raw(env, "POE_TOKEN") or ""),
            service_token=Secret(_raw(env, "POE_SERVICE_TOKEN") or ""),
            upload_quota_bytes=_bytes(env, "POE_UPLOAD_QUOTA_BYTES", 2 * 1024**3),
            tls_server_cert=_path(env, "POE_TLS_SERVER_CERT"),
            tls_server_key=_path(env, "POE_TLS_SERVER_KEY"),
            tls_client_ca=_path(env, "POE_TLS_CLIENT_CA"),
            tls_ca=_path(env, "POE_TLS_CA"),
            tls_cert=_path(env, "POE_TLS_CERT"),
            tls_key=_path(env, "POE_TLS_KEY"),
            tls_server_name=_raw(env, "POE_TLS_SERVER_NAME") or "",
            extractor_oracle_dir=_path(env, "POE_EXTRACTOR_ORACLE_DIR"),
            extractor_id=_extractor_id(env),
        )


def settings(**overrides) -> Settings:
    """Current settings; keyword arguments that are not None replace the environment's values."""
    base = Settings.from_env()
    known = {f.name for f in fields(Settings)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown settings: {sorted(unknown)}")
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def resolve_device(name: str | None = None) -> str:
    """`auto` picks CUDA when available, else CPU."""
    import torch

    name = name or settings().device
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        from poe.engine.errors import InvalidArgument

        raise InvalidArgument(f"device {name!r} requested but CUDA is not available")
    return name
