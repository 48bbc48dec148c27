"""A composed model as an entry of a Triton Inference Server model repository.

    REPO/NAME/config.pbtxt      backend, dynamic batch, named input and output
    REPO/NAME/labels.txt        class names in output-column order (Triton's classification extension)
    REPO/NAME/1/model.onnx      or model.pt for TorchScript

ONNX runs on Triton's onnxruntime backend with the file's own tensor names; TorchScript on its
pytorch backend, which binds tensors by the `<name>__<index>` convention. pt2 and safetensors have
no Triton backend that loads them as they are.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from poe.engine.errors import InvalidArgument
from poe.engine.onnx_export import INPUT_NAME, OUTPUT_NAME


@dataclass(frozen=True)
class _Backend:
    backend: str
    filename: str
    input_name: str
    output_name: str


BACKENDS = {
    "onnx": _Backend("onnxruntime", "model.onnx", INPUT_NAME, OUTPUT_NAME),
    "torchscript": _Backend("pytorch", "model.pt", f"{INPUT_NAME}__0", f"{OUTPUT_NAME}__0"),
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def config_text(name: str, fmt: str, meta: dict, max_batch_size: int = 256) -> str:
    """config.pbtxt (protobuf text format of Triton's ModelConfig) for a composed model."""
    b = _backend(fmt)
    dims = ", ".join(str(int(d)) for d in meta["input"]["shape"])
    return "\n".join([
        f"# PoE composed model: {len(meta['classes'])} classes from {meta['pool']}; poe.json is inside the model file.",
        f"name: {json.dumps(name)}",
        f"backend: {json.dumps(b.backend)}",
        f"max_batch_size: {max_batch_size}",
        "input [",
        "  {",
        f"    name: {json.dumps(b.input_name)}",
        "    data_type: TYPE_FP32",
        f"    dims: [ {dims} ]",
        "  }",
        "]",
        "output [",
        "  {",
        f"    name: {json.dumps(b.output_name)}",
        "    data_type: TYPE_FP32",
        f"    dims: [ {len(meta['classes'])} ]",
        '    label_filename: "labels.txt"',
        "  }",
        "]",
        "dynamic_batching { }",
        "",
    ])


def write_entry(repo: str | Path, name: str, data: bytes, fmt: str, meta: dict, max_batch_size: int = 256,
                version: int = 1) -> Path:
    """Write the model-repository entry REPO/NAME (replacing files of the same names); returns its folder."""
    check_entry(name, fmt, max_batch_size, version)
    b = _backend(fmt)
    entry = Path(repo) / name
    _write(entry / str(version) / b.filename, data)
    _write(entry / "labels.txt", "".join(f"{c}\n" for c in meta["classes"]).encode())
    _write(entry / "config.pbtxt", config_text(name, fmt, meta, max_batch_size).encode())
    return entry


def check_entry(name: str, fmt: str, max_batch_size: int = 256, version: int = 1) -> None:
    """InvalidArgument unless an entry of this name, format and batch size can be written."""
    _backend(fmt)
    if not _NAME.fullmatch(name):
        raise InvalidArgument(f"triton model name {name!r}: use letters, digits, '_', '.' and '-' (at most 128, "
                              "starting with a letter or digit)")
    if max_batch_size < 1:
        raise InvalidArgument(f"triton max batch size: must be at least 1 (dynamic batching), got {max_batch_size}")
    if version < 1:
        raise InvalidArgument(f"triton model version: must be at least 1, got {version}")


def _backend(fmt: str) -> _Backend:
    try:
        return BACKENDS[fmt]
    except KeyError:
        raise InvalidArgument(f"triton: a model repository entry needs format {' or '.join(BACKENDS)}, "
                              f"not {fmt}") from None


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
