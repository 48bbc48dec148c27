"""Input checks shared by the store and the servicer; every error names its field."""

from __future__ import annotations

import base64
import hashlib
import json
import math

from poe.engine.errors import field_error
from poe.engine.names import ALIAS, FORMAT, NAME, SHA256, VERSION


def name(value: str, field: str, what: str = "name") -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise field_error(field, f"{what} {value!r} must be 1-63 lower-case letters, digits, '.', '_' or '-'")
    return value


def version(value: str, field: str = "version") -> str:
    if not isinstance(value, str) or not VERSION.match(value):
        raise field_error(field, f"version {value!r} must be 1-64 letters, digits, '.', '_', '+' or '-'")
    return value


def alias(value: str, field: str = "alias") -> str:
    if not isinstance(value, str) or not ALIAS.match(value):
        raise field_error(field, f"alias {value!r} must start with a lower-case letter, then letters, digits, "
                                 "'.', '_' or '-'")
    return value


def label(value: str, field: str = "name") -> str:
    """A free-form display name (artifacts)."""
    if not isinstance(value, str) or not value.strip() or len(value) > 256 or not value.isprintable():
        raise field_error(field, "must be 1-256 printable characters")
    return value


def sha256(value: str, field: str = "sha256") -> str:
    if not isinstance(value, str) or not SHA256.match(value):
        raise field_error(field, f"expected 64 lower-case hex digits, got {str(value)[:80]!r}")
    return value


def positive_id(value: int, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise field_error(field, f"expected a positive id, got {value!r}")
    return value


def non_negative(value: int, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise field_error(field, f"must be >= 0, got {value!r}")
    return value


def fraction(value: float | None, field: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value <= 1.0:
        raise field_error(field, f"must be in [0, 1], got {value!r}")
    return float(value)


def mapping(value: object, field: str) -> dict:
    if not isinstance(value, dict):
        raise field_error(field, f"expected a JSON object, got {type(value).__name__}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise field_error(field, f"not JSON-serialisable ({e})") from None
    return value


def parse_json_object(text: str, field: str) -> dict:
    """A request's `*_json` field: empty means {}, anything else must be a JSON object."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise field_error(field, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(value, dict):
        raise field_error(field, f"expected a JSON object, got {type(value).__name__}")
    return value


def class_ids(values, field: str = "class_ids", *, allow_empty: bool = False) -> tuple[int, ...]:
    ids = tuple(values)
    if not ids and not allow_empty:
        raise field_error(field, "must not be empty")
    bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or i < 0]
    if bad:
        raise field_error(field, f"class ids must be integers >= 0, got {bad[:5]}")
    if len(set(ids)) != len(ids):
        raise field_error(field, f"duplicate class ids in {list(ids)}")
    return ids


def pool_ref(ref: str, field: str = "pool") -> tuple[str, str | None]:
    """"name", "name@version" or "name@alias" -> (name, tag or None)."""
    if not isinstance(ref, str) or not ref:
        raise field_error(field, "expected NAME, NAME@VERSION or NAME@ALIAS")
    pool_name, sep, tag = ref.partition("@")
    name(pool_name, field, "pool name")
    if sep:
        if not tag:
            raise field_error(field, f"{ref!r}: nothing after '@' (expected NAME@VERSION or NAME@ALIAS)")
        version(tag, field)
        return pool_name, tag
    return pool_name, None


# -- specs (checked before an upload's bytes are read, and again by the store) ------------------

def _check_artifact_spec(spec, *, with_loss: bool) -> None:
    """The fields oracles, libraries and experts share, in the order they are checked."""
    mapping(spec.config, "config_json")
    mapping(spec.metrics, "metrics_json")
    if with_loss:
        mapping(spec.loss, "loss_json")
    non_negative(spec.params, "params")


def check_oracle_spec(spec) -> None:
    label(spec.name)
    name(spec.dataset, "dataset", "data set name")
    _check_artifact_spec(spec, with_loss=False)


def check_library_spec(spec) -> None:
    label(spec.name)
    name(spec.dataset, "dataset", "data set name")
    _check_artifact_spec(spec, with_loss=True)
    if spec.oracle_id is not None:
        positive_id(spec.oracle_id, "oracle_id")


def check_expert_spec(spec) -> None:
    positive_id(spec.library_id, "library_id")
    if not isinstance(spec.hierarchy_version, int) or spec.hierarchy_version < 1:
        raise field_error("hierarchy_version", f"must be >= 1, got {spec.hierarchy_version!r}")
    name(spec.task, "task", "task name")
    ids = class_ids(spec.class_ids)
    _check_artifact_spec(spec, with_loss=True)
    fraction(spec.val_accuracy, "val_accuracy")
    n = spec.config.get("num_classes")
    if n is not None and n != len(ids):
        raise field_error("config_json", f"num_classes is {n} but class_ids has {len(ids)} classes")


def check_composed_spec(spec) -> None:
    class_ids(spec.class_ids)
    if not isinstance(spec.format, str) or not FORMAT.match(spec.format):
        raise field_error("format", f"{spec.format!r} must be 1-32 lower-case letters, digits, '.', '_', '-'")
    mapping(spec.metadata, "metadata_json")
    pool_ref(spec.pool)


# -- pagination ----------------------------------------------------------------------------------

def page_size(value: int, default: int, maximum: int) -> int:
    if value < 0:
        raise field_error("page_size", f"must be >= 0, got {value}")
    return default if value == 0 else min(value, maximum)


def _fingerprint(query: object) -> str:
    return hashlib.sha256(repr(query).encode()).hexdigest()[:16]


def encode_page_token(offset: int, query: object) -> str:
    raw = json.dumps({"o": offset, "q": _fingerprint(query)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, query: object) -> int:
    if not token:
        return 0
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        offset, fp = int(data["o"]), str(data["q"])
    except (ValueError, KeyError, TypeError):
        raise field_error("page_token", "not a token from a previous response") from None
    if offset < 0:
        raise field_error("page_token", "not a token from a previous response")
    if fp != _fingerprint(query):
        raise field_error("page_token", "was issued for a request with different filters")
    return offset

