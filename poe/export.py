"""Composed model files: TorchScript with a `poe.json` extra file (DESIGN.md's contract).

A file written here loads with plain torch, without this project installed::

    extra = {"poe.json": ""}
    model = torch.jit.load(path, _extra_files=extra)
    meta = json.loads(extra["poe.json"])   # classes, class_ids, input, pool, experts, params, sha256
    logits = model(x)                      # x: float32 [N, C, H, W] in [0, 1]

`sha256` in poe.json is the hash of the weights: the canonical safetensors serialisation of the
model's state dict (`poe.pool.tensors_to_bytes`), so it identifies the function, not the container.
"""

from __future__ import annotations

import io
import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from poe.compose import ComposedModel, Plan
from poe.errors import InvalidArgument
from poe.nets import count_params
from poe.pool import Pool, sha256_hex, tensors_to_bytes

EXTRA_FILE = "poe.json"


@contextmanager
def quiet_jit():
    """torch 2.13 marks torch.jit.{script,save,load} deprecated; silence exactly those warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        yield


def metadata(pool: Pool, p: Plan, model: nn.Module, execution: str) -> dict:
    return {
        "format": "poe.model/v1",
        "classes": list(p.class_names),
        "class_ids": list(p.class_ids),
        "input": {"shape": list(pool.input_shape), "range": [0, 1], "dtype": "float32"},
        "pool": p.pool,
        "experts": [f"{p.pool}/{t}" for t in p.tasks],
        "tasks": list(p.tasks),
        "execution": execution,
        "params": count_params(model),
        "sha256": weights_sha256(model),
    }


def weights_sha256(model: nn.Module) -> str:
    return sha256_hex(tensors_to_bytes(model.state_dict()))


def script(model: ComposedModel) -> torch.jit.ScriptModule:
    with quiet_jit():
        return torch.jit.script(model)


def to_torchscript_bytes(model: ComposedModel | torch.jit.ScriptModule, meta: dict) -> bytes:
    scripted = model if isinstance(model, torch.jit.ScriptModule) else script(model)
    buf = io.BytesIO()
    with quiet_jit():
        torch.jit.save(scripted, buf, _extra_files={EXTRA_FILE: json.dumps(meta, sort_keys=True)})
    return buf.getvalue()


def load_torchscript(source: str | Path | bytes) -> tuple[torch.jit.ScriptModule, dict]:
    """Load a composed model file; returns the module (eval mode) and its poe.json."""
    extra = {EXTRA_FILE: ""}
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise InvalidArgument(f"{source}: no such file")
    try:
        with quiet_jit():
            if isinstance(source, bytes):
                m = torch.jit.load(io.BytesIO(source), map_location="cpu", _extra_files=extra)
            else:
                m = torch.jit.load(str(source), map_location="cpu", _extra_files=extra)
    except FileNotFoundError:
        raise InvalidArgument(f"{source}: no such file") from None
    except (RuntimeError, ValueError) as e:
        raise InvalidArgument(f"{source if not isinstance(source, bytes) else 'model'}: not a TorchScript "
                              f"model file ({str(e).splitlines()[0][:120]})") from None
    if not extra[EXTRA_FILE]:
        raise InvalidArgument(f"{source}: TorchScript file without {EXTRA_FILE}; not a PoE model")
    return m.eval(), json.loads(extra[EXTRA_FILE])
