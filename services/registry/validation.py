"""Input checks shared by the store and the servicer; every error names its field.

The limits themselves and the generic checks live in `poe.engine.limits`; this module applies
them to the registry's specs and keeps the (value, field) signatures the store uses.
"""

from __future__ import annotations

import math

from poe.engine import limits
from poe.engine.errors import field_error


def name(value: str, field: str, what: str = "name") -> str:
    return limits.check_name(field, value, what)


def version(value: str, field: str = "version") -> str:
    return limits.check_version(field, value)


def alias(value: str, field: str = "alias") -> str:
    return limits.check_alias(field, value)


def label(value: str, field: str = "name") -> str:
    """A free-form display name (artifacts)."""
    return limits.check_label(field, value)


def sha256(value: str, field: str = "sha256") -> str:
    return limits.check_sha256(field, value)


def positive_id(value: int, field: str) -> int:
    return limits.check_id(field, value)


def non_negative(value: int, field: str) -> int:
    return limits.check_int_range(field, value, 0, limits.MAX_INT64)


def fraction(value: float | None, field: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value) \
            or not 0.0 <= value <= 1.0:
        raise field_error(field, f"must be in [0, 1], got {limits.quote(value)}")
    return float(value)


def mapping(value: object, field: str, max_bytes: int = limits.MAX_JSON_BYTES) -> dict:
    """A JSON object within the size and depth limits (as it will be served)."""
    return limits.check_json_object(field, value, max_bytes=max_bytes)


def parse_json_object(text: str, field: str, max_bytes: int = limits.MAX_JSON_BYTES) -> dict:
    """A request's `*_json` field: empty means {}, anything else must be a JSON object."""
    return limits.parse_json(field, text, max_bytes=max_bytes)


def class_ids(values, field: str = "class_ids", *, allow_empty: bool = False) -> tuple[int, ...]:
    ids = tuple(values)
    if not ids and not allow_empty:
        raise field_error(field, "must not be empty")
    limits.check_count(field, ids, limits.MAX_CLASSES, "class ids")
    bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < limits.MAX_CLASSES]
    if bad:
        raise field_error(field, f"class ids must be integers in [0, {limits.MAX_CLASSES - 1}], "
                                 f"got {limits.listing(bad, 5)}")
    if len(set(ids)) != len(ids):
        raise field_error(field, f"duplicate class ids in {limits.listing(ids, 20)}")
    return ids


def pool_ref(ref: str, field: str = "pool") -> tuple[str, str | None]:
    """"name", "name@version" or "name@alias" -> (name, tag or None)."""
    return limits.parse_pool_ref(field, ref)


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
    limits.check_network_config("config_json", spec.config)


def check_library_spec(spec) -> None:
    label(spec.name)
    name(spec.dataset, "dataset", "data set name")
    _check_artifact_spec(spec, with_loss=True)
    limits.check_network_config("config_json", spec.config)
    if spec.oracle_id is not None:
        positive_id(spec.oracle_id, "oracle_id")


def check_expert_spec(spec) -> None:
    positive_id(spec.library_id, "library_id")
    limits.check_int_range("hierarchy_version", spec.hierarchy_version, 1, limits.MAX_INT32)
    name(spec.task, "task", "task name")
    ids = class_ids(spec.class_ids)
    _check_artifact_spec(spec, with_loss=True)
    limits.check_expert_config("config_json", spec.config)
    fraction(spec.val_accuracy, "val_accuracy")
    n = spec.config.get("num_classes")
    if n is not None and n != len(ids):
        raise field_error("config_json", f"num_classes is {n} but class_ids has {len(ids)} classes")


def check_composed_spec(spec) -> None:
    class_ids(spec.class_ids)
    limits.check_format("format", spec.format)
    mapping(spec.metadata, "metadata_json", limits.MAX_LARGE_JSON_BYTES)
    pool_ref(spec.pool)


def check_pool_spec(spec) -> None:
    name(spec.name, "name", "pool name")
    version(spec.version)
    positive_id(spec.library_id, "library_id")
    if not spec.expert_ids:
        raise field_error("expert_ids", "a pool needs at least one expert")
    limits.check_count("expert_ids", spec.expert_ids, limits.MAX_TASKS, "experts")
    for i in spec.expert_ids:
        positive_id(i, "expert_ids")
    if len(set(spec.expert_ids)) != len(spec.expert_ids):
        raise field_error("expert_ids", f"duplicate expert ids in {limits.listing(spec.expert_ids, 20)}")
    limits.check_count("aliases", spec.aliases, limits.MAX_ALIASES, "aliases")
    for a in spec.aliases:
        alias(a, "aliases")
    mapping(spec.info, "info_json")
    limits.check_text("description", spec.description, limits.MAX_DESCRIPTION_CHARS, multiline=True)


def check_job_update(update) -> None:
    fraction(update.progress, "progress")
    if update.stage is not None:
        limits.check_text("stage", update.stage, limits.MAX_JOB_STAGE_CHARS)
    if update.message is not None:
        limits.check_text("message", update.message, limits.MAX_JOB_MESSAGE_CHARS, multiline=True)
    if update.error is not None:
        limits.check_text("error", update.error, limits.MAX_JOB_ERROR_CHARS, multiline=True)
    if update.oracle_id is not None:
        positive_id(update.oracle_id, "oracle_id")
    if update.pool is not None:
        pool_ref(update.pool)


# -- pagination ----------------------------------------------------------------------------------

def page_size(value: int, default: int, maximum: int) -> int:
    return limits.check_page_size(value, default, maximum)


encode_page_token = limits.encode_page_token


def decode_page_token(token: str, query: object) -> int:
    return limits.decode_page_token(token, query)
