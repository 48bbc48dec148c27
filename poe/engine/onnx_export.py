"""Composed models as ONNX: export, templates for the composer's hot path, and loading.

The file: input "images" float32 [N, C, H, W] in [0, 1], output "logits" float32 [N, K] (N
dynamic), opset 18, every weight an initializer inside the file; `poe.json` is the model's
`metadata_props` entry of that key. With onnxruntime::

    session = onnxruntime.InferenceSession("model.onnx")
    meta = json.loads(session.get_modelmeta().custom_metadata_map["poe.json"])
    logits = session.run(["logits"], {"images": images})[0]

`torch.onnx.export` takes 1-3 s a model, so the composer exports once per tensor layout and writes
each composition into that export (`OnnxTemplate`): an ONNX file is a protobuf whose initializers
hold their bytes in `raw_data`, and two compositions of one layout differ only in those bytes and
in `poe.json`. The template is the serialized export of probe tensors (all values distinct, as for
the zip templates of `poe.engine.archive`); walking the protobuf wire format tells where each
initializer's bytes lie, and `render` copies the template with a state's bytes there. The export
runs unoptimised (`optimize=False`): the optimiser folds BatchNorm into convolutions, which would
turn initializers into functions of several tensors. Runtimes (onnxruntime, TensorRT) fold at load.

Exporting needs the `onnx` and `onnxscript` packages; running a file needs `onnxruntime`.
"""

from __future__ import annotations

import json
import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from poe.engine.archive import TemplateError, WeightsDigest, matching_probe, tensor_bytes, tensor_layout
from poe.engine.errors import FailedPrecondition, InvalidArgument

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
METADATA_KEY = "poe.json"
OPSET = 18  # served by onnxruntime >= 1.14 and Triton's ONNX backend since 23.02

# onnx.TensorProto.DataType values of the dtypes a composed state holds.
_ONNX_DTYPES = {torch.float32: 1, torch.uint8: 2, torch.int8: 3, torch.int16: 5, torch.int32: 6, torch.int64: 7,
                torch.bool: 9, torch.float16: 10, torch.float64: 11, torch.bfloat16: 16}
# Field numbers in onnx.proto: ModelProto.graph, .metadata_props; GraphProto.initializer, .node;
# TensorProto.data_type, .name, .raw_data, .data_location; NodeProto.op_type.
_MODEL_GRAPH, _MODEL_METADATA = 7, 14
_GRAPH_INITIALIZER = 5
_TENSOR_DATA_TYPE, _TENSOR_NAME, _TENSOR_RAW_DATA, _TENSOR_DATA_LOCATION = 2, 8, 9, 14
_LEN = 2  # wire type of length-delimited fields
# torch.export (which torch.onnx.export runs) keeps global tracing state: one export at a time.
EXPORT_LOCK = threading.Lock()


@contextmanager
def _quiet_export() -> Iterator[None]:
    """torch.onnx.export logs a warning per torchvision op it cannot register, its IR passes log
    INFO lines per export, and pytree warns of a deprecation in torch's own code; none concerns
    the model."""
    quieted = {"torch.onnx._internal.exporter._registration": logging.ERROR, "onnx_ir": logging.WARNING}
    loggers = {name: logging.getLogger(name) for name in quieted}
    levels = {name: lg.level for name, lg in loggers.items()}
    for name, lg in loggers.items():
        lg.setLevel(quieted[name])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for name, lg in loggers.items():
            lg.setLevel(levels[name])


def export_onnx(model: nn.Module, input_shape: tuple[int, ...] | list[int]):
    """The ONNX ModelProto of `model` (eval mode) for inputs [N, *input_shape], N dynamic."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it; fail with a clear message)
    except ImportError:
        raise FailedPrecondition("ONNX export needs the onnx and onnxscript packages: pip install onnx onnxscript") \
            from None
    example = torch.zeros(2, *input_shape)  # 2, not 1: torch.export specialises a size-1 dimension
    with EXPORT_LOCK, _quiet_export():
        program = torch.onnx.export(model.eval(), (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), dynamo=True,
                                    optimize=False, external_data=False, opset_version=OPSET, verbose=False)
    return program.model_proto


def to_onnx_bytes(model: nn.Module, meta: dict, input_shape: tuple[int, ...] | list[int]) -> bytes:
    """A fresh export of `model` with `meta` as poe.json (no template)."""
    proto = export_onnx(model, input_shape)
    _set_metadata(proto, json.dumps(meta, sort_keys=True))
    return proto.SerializeToString()


def _set_metadata(proto, value: str) -> None:
    kept = [(e.key, e.value) for e in proto.metadata_props if e.key != METADATA_KEY]
    del proto.metadata_props[:]
    for k, v in kept:
        proto.metadata_props.add(key=k, value=v)
    proto.metadata_props.add(key=METADATA_KEY, value=value)


# -- the protobuf wire format, as far as templates need it ----------------------------------------

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise TemplateError("truncated varint")
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, value end) of each field in buf[start:end];
    a length-delimited value's span excludes its length prefix, a varint's is the varint."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, after = _varint(buf, pos)
            yield number, wire, field_start, pos, after
            pos = after
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            yield number, wire, field_start, pos, pos + size
            pos += size
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            yield number, wire, field_start, pos, pos + size
            pos += size
        else:
            raise TemplateError(f"unsupported protobuf wire type {wire}")
    if pos != end:
        raise TemplateError("malformed protobuf")


def _entry(key: str, value: str) -> bytes:
    """A ModelProto.metadata_props field (a StringStringEntryProto) as protobuf writes it."""
    def length_delimited(number: int, payload: bytes) -> bytes:
        return _encode_varint(number << 3 | _LEN) + _encode_varint(len(payload)) + payload

    return length_delimited(_MODEL_METADATA, length_delimited(1, key.encode()) + length_delimited(2, value.encode()))


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


@dataclass(frozen=True)
class _Slot:
    name: str  # the state's tensor
    offset: int  # where its bytes start in the template's head
    size: int


class OnnxTemplate:
    """One serialized export per tensor layout; `render` writes a composition's tensors into it."""

    _SENTINEL = "\x00poe-template\x00"

    def __init__(self, layout: tuple, head: bytes, tail: bytes, slots: list[_Slot], digest: WeightsDigest):
        self.layout = layout
        self._head, self._tail, self._slots, self._digest = head, tail, slots, digest

    @classmethod
    def from_model(cls, proto, probe: dict[str, torch.Tensor]) -> OnnxTemplate:
        """A template from the ModelProto exported for a module holding `probe` (`export_onnx`)."""
        by_bytes = matching_probe(probe)
        for node in proto.graph.node:  # a state tensor folded into the graph would stay the probe's
            for attr in node.attribute:
                if attr.HasField("t") and attr.t.raw_data in by_bytes:
                    raise TemplateError(f"tensor {by_bytes[attr.t.raw_data]} is a constant of node {node.name}")
        _set_metadata(proto, cls._SENTINEL)
        data = proto.SerializeToString()
        slots, sentinel = [], None
        for number, wire, field_start, start, end in _fields(data, 0, len(data)):
            if number == _MODEL_GRAPH and wire == _LEN:
                slots += cls._initializer_slots(data, start, end, by_bytes, probe)
            elif number == _MODEL_METADATA and wire == _LEN and cls._SENTINEL.encode() in data[start:end]:
                sentinel = (field_start, end)
        if sentinel is None:
            raise TemplateError("the serialized model lost its metadata entry")
        if any(s.offset + s.size > sentinel[0] for s in slots):
            raise TemplateError("initializers after the metadata")
        return cls(tensor_layout(probe), data[:sentinel[0]], data[sentinel[1]:], slots, WeightsDigest(probe))

    @staticmethod
    def _initializer_slots(data: bytes, start: int, end: int, by_bytes: dict[bytes, str],
                           probe: dict[str, torch.Tensor]) -> list[_Slot]:
        slots = []
        for number, wire, _, t_start, t_end in _fields(data, start, end):
            if number != _GRAPH_INITIALIZER or wire != _LEN:
                continue
            name, dtype, raw, external = "?", None, None, False
            for f, w, _, v_start, v_end in _fields(data, t_start, t_end):
                if f == _TENSOR_NAME and w == _LEN:
                    name = data[v_start:v_end].decode(errors="replace")
                elif f == _TENSOR_DATA_TYPE and w == 0:
                    dtype = _varint(data, v_start)[0]
                elif f == _TENSOR_RAW_DATA and w == _LEN:
                    raw = (v_start, v_end)
                elif f == _TENSOR_DATA_LOCATION and w == 0:
                    external = _varint(data, v_start)[0] == 1
            if raw is None or external:
                raise TemplateError(f"initializer {name}: no raw_data in the file")
            tensor = by_bytes.get(data[raw[0]:raw[1]])
            if tensor is None or _ONNX_DTYPES.get(probe[tensor].dtype) != dtype:
                raise TemplateError(f"initializer {name} is none of the state's tensors")
            slots.append(_Slot(tensor, raw[0], raw[1] - raw[0]))
        return slots

    @property
    def nbytes(self) -> int:
        return len(self._head) + len(self._tail) + self._digest.nbytes

    def views(self, state: dict[str, torch.Tensor]) -> dict[str, memoryview]:
        if tensor_layout(state) != self.layout:
            raise ValueError("ONNX template: the state's layout differs from the template's")
        return {name: tensor_bytes(t) for name, t in state.items()}

    def weights_sha256(self, views: dict[str, memoryview]) -> str:
        return self._digest.hexdigest(views)

    def render(self, views: dict[str, memoryview], meta: dict) -> bytes:
        out = bytearray(self._head)
        for s in self._slots:
            out[s.offset:s.offset + s.size] = views[s.name]
        return b"".join((out, _entry(METADATA_KEY, json.dumps(meta, sort_keys=True)), self._tail))


# -- loading ---------------------------------------------------------------------------------------

class OnnxModel:
    """An ONNX composed model run by onnxruntime, called like the torch module: images -> logits."""

    def __init__(self, session):
        self.session = session

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        images = x.detach().to(torch.float32).cpu().contiguous().numpy()
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: images})[0])

    def eval(self) -> OnnxModel:
        return self


def is_onnx(data: bytes) -> bool:
    """Whether `data` parses as an ONNX model with a graph (ONNX files have no magic number)."""
    import onnx
    from google.protobuf.message import DecodeError

    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError):
        return False
    return proto.ir_version > 0 and len(proto.graph.node) > 0


def load_onnx(source: str | Path | bytes, label: str = "model") -> tuple[OnnxModel, dict]:
    """An ONNX composed model file (path or bytes) and its poe.json; needs onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        raise FailedPrecondition("running an ONNX model needs onnxruntime: pip install onnxruntime") from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.log_severity_level = 3  # errors only
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for a file it cannot run
        raise InvalidArgument(f"{label}: not a runnable ONNX model ({str(e).splitlines()[0][:120]})") from None
    meta = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if not meta:
        raise InvalidArgument(f"{label}: ONNX file without {METADATA_KEY} metadata; not a PoE model")
    return OnnxModel(session), json.loads(meta)
