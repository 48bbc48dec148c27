"""The typed contract: every conversion between the `poe.v1` messages and domain values.

Clients and servicers both convert through this module, so an enum value, an extraction state or a
hierarchy is spelled out once. It depends on the generated stubs and on the engine's light modules
(no torch), never on a service.
"""

from __future__ import annotations

import dataclasses
import json

from poe.engine import limits
from poe.engine.errors import field_error
from poe.engine.hierarchy import Hierarchy
from poe.v1 import common_pb2 as c
from poe.v1 import composer_pb2 as cpb

# -- enums -----------------------------------------------------------------------------------------

EXECUTIONS = {"fused": cpb.EXECUTION_FUSED, "reference": cpb.EXECUTION_REFERENCE}
FORMATS = {"torchscript": cpb.MODEL_FORMAT_TORCHSCRIPT, "pt2": cpb.MODEL_FORMAT_PT2, "onnx": cpb.MODEL_FORMAT_ONNX,
           "safetensors": cpb.MODEL_FORMAT_SAFETENSORS}
_EXECUTION_NAMES = {v: k for k, v in EXECUTIONS.items()} | {cpb.EXECUTION_UNSPECIFIED: "fused"}
_FORMAT_NAMES = {v: k for k, v in FORMATS.items()} | {cpb.MODEL_FORMAT_UNSPECIFIED: "torchscript"}


def execution_name(value: int, field: str = "execution") -> str:
    """"fused" | "reference" for an Execution enum value (UNSPECIFIED: the default, fused)."""
    try:
        return _EXECUTION_NAMES[value]
    except KeyError:
        raise field_error(field, f"unknown value {value}") from None


def format_name(value: int, field: str = "format") -> str:
    """"torchscript" | "pt2" | "onnx" | "safetensors" for a ModelFormat enum value (UNSPECIFIED: torchscript)."""
    try:
        return _FORMAT_NAMES[value]
    except KeyError:
        raise field_error(field, f"unknown value {value}") from None


def request_refs(classes, tasks) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The class and task references of a request message (ComposeModel, DescribeComposition,
    ResolveClasses), blank entries dropped; InvalidArgument (`classes` or `tasks`) beyond the
    limits on their number and length."""
    limits.check_refs("classes", classes, limits.MAX_CLASSES)
    limits.check_refs("tasks", tasks, limits.MAX_TASKS)
    return tuple(x for x in classes if x.strip()), tuple(t for t in tasks if t.strip())


# -- the ComposeModel header ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class ComposeHeader:
    """What ComposeModel sends before a model's bytes, and DescribeComposition returns
    (`poe.v1.ComposedModelHeader`; the proto documents each field)."""

    model_id: str
    pool: str  # name@version
    classes: tuple[str, ...]  # output columns in order
    class_ids: tuple[int, ...]
    tasks: tuple[str, ...]  # primitive tasks whose experts were consolidated
    expert_ids: tuple[int, ...]
    params: int
    flops: int
    size: int = 0  # size and sha256 of the model file; 0 and "" until it is built
    sha256: str = ""
    format: str = "torchscript"  # a key of FORMATS
    execution: str = "fused"  # a key of EXECUTIONS
    input_shape: tuple[int, ...] = ()  # [C, H, W]
    expected_accuracy: float = 0.0
    cache_hit: bool = False
    metadata: dict = dataclasses.field(default_factory=dict)  # the model's poe.json
    degraded: bool = False  # a blob of the pool version failed its last fetch
    degraded_tasks: tuple[str, ...] = ()  # the tasks whose expert blob failed

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise field_error("format", f"expected one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.execution not in EXECUTIONS:
            raise field_error("execution", f"expected one of {', '.join(EXECUTIONS)}, got {self.execution!r}")

    def to_message(self) -> cpb.ComposedModelHeader:
        return cpb.ComposedModelHeader(
            model_id=self.model_id, pool=self.pool, classes=self.classes, class_ids=self.class_ids, tasks=self.tasks,
            expert_ids=self.expert_ids, params=self.params, flops=self.flops, size=self.size, sha256=self.sha256,
            format=FORMATS[self.format], execution=EXECUTIONS[self.execution], input_shape=self.input_shape,
            expected_accuracy=self.expected_accuracy, cache_hit=self.cache_hit,
            metadata_json=json.dumps(self.metadata, sort_keys=True) if self.metadata else "",
            degraded=self.degraded, degraded_tasks=self.degraded_tasks)

    @classmethod
    def from_message(cls, msg: cpb.ComposedModelHeader) -> ComposeHeader:
        try:
            metadata = json.loads(msg.metadata_json) if msg.metadata_json else {}
        except json.JSONDecodeError as err:
            raise field_error("header.metadata_json", f"not JSON ({err})") from None
        return cls(model_id=msg.model_id, pool=msg.pool, classes=tuple(msg.classes), class_ids=tuple(msg.class_ids),
                   tasks=tuple(msg.tasks), expert_ids=tuple(msg.expert_ids), params=msg.params, flops=msg.flops,
                   size=msg.size, sha256=msg.sha256, format=format_name(msg.format, "header.format"),
                   execution=execution_name(msg.execution, "header.execution"), input_shape=tuple(msg.input_shape),
                   expected_accuracy=msg.expected_accuracy, cache_hit=msg.cache_hit, metadata=metadata,
                   degraded=msg.degraded, degraded_tasks=tuple(msg.degraded_tasks))


# -- extraction states -----------------------------------------------------------------------------

STATES = {"pending": c.EXTRACTION_STATE_PENDING, "running": c.EXTRACTION_STATE_RUNNING,
          "succeeded": c.EXTRACTION_STATE_SUCCEEDED, "failed": c.EXTRACTION_STATE_FAILED,
          "cancelled": c.EXTRACTION_STATE_CANCELLED}
_STATE_NAMES = {v: k for k, v in STATES.items()}
TERMINAL_STATES = frozenset({c.EXTRACTION_STATE_SUCCEEDED, c.EXTRACTION_STATE_FAILED, c.EXTRACTION_STATE_CANCELLED})


def state_value(name: str | None, field: str = "state") -> int:
    """The ExtractionState enum value for a state name; "" or None is UNSPECIFIED (any state)."""
    if not name:
        return c.EXTRACTION_STATE_UNSPECIFIED
    try:
        return STATES[str(name).lower()]
    except KeyError:
        raise field_error(field, f"unknown state {name!r} (expected one of {', '.join(STATES)})") from None


def state_name(value: int) -> str:
    """"pending" | "running" | "succeeded" | "failed" | "cancelled", or "unspecified"."""
    return _STATE_NAMES.get(value, "unspecified")


# -- hierarchies -----------------------------------------------------------------------------------

def hierarchy_message(h: Hierarchy) -> c.Hierarchy:
    """A Hierarchy message with both class ids and class names per primitive task."""
    return c.Hierarchy(dataset=h.dataset, version=h.version, classes=list(h.classes),
                       tasks=[c.PrimitiveTask(name=t, class_ids=list(ids), class_names=[h.classes[i] for i in ids])
                              for t, ids in h.tasks.items()])


def hierarchy_from_message(msg: c.Hierarchy, field: str = "hierarchy") -> Hierarchy:
    """The domain hierarchy of a message; a task may list class ids or class names (case-insensitive).

    Raises InvalidArgument naming `field` when the message is inconsistent."""
    classes = tuple(msg.classes)
    limits.check_class_names(f"{field}.classes", classes)
    limits.check_count(f"{field}.tasks", msg.tasks, limits.MAX_TASKS, "tasks")
    index = {limits.class_key(n): i for i, n in enumerate(classes)}
    tasks: dict[str, tuple[int, ...]] = {}
    for t in msg.tasks:
        limits.check_name(f"{field}.tasks", t.name, "task name")
        if t.class_ids:
            ids = tuple(t.class_ids)
            bad = [i for i in ids if not 0 <= i < len(classes)]
            if bad:
                raise field_error(f"{field}.tasks", f"task {t.name!r}: class ids {limits.listing(bad)} out of "
                                                    f"range 0..{len(classes) - 1}")
        else:  # names only
            unknown = [limits.quote(n) for n in t.class_names if limits.class_key(n) not in index]
            if unknown:
                raise field_error(f"{field}.tasks", f"task {t.name!r}: unknown classes {limits.listing(unknown)}")
            ids = tuple(index[limits.class_key(n)] for n in t.class_names)
        if t.name in tasks:
            raise field_error(f"{field}.tasks", f"task {t.name!r} listed twice")
        tasks[t.name] = ids
    try:
        return Hierarchy(msg.dataset, msg.version or 1, classes, tasks)
    except ValueError as err:  # InvalidArgument from the hierarchy's own validation, naming its part
        part = getattr(err, "field", None)
        if part:
            raise field_error(f"{field}.{part}", str(err).removeprefix(f"{part}: ")) from None
        raise field_error(field, str(err)) from None
