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
import queue
import threading
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from poe.compose import ComposedModel, Plan, plan_params
from poe.errors import InvalidArgument
from poe.pool import Pool, sha256_hex, tensors_to_bytes

EXTRA_FILE = "poe.json"


@contextmanager
def quiet_jit():
    """torch 2.13 marks torch.jit.{script,save,load} deprecated; silence exactly those warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        yield


def metadata(pool: Pool, p: Plan, model: nn.Module | None, execution: str,
             weights_sha256_hex: str | None = None) -> dict:
    """poe.json for a composition; pass the weights' sha256 when there is no model object."""
    return {
        "format": "poe.model/v1",
        "classes": list(p.class_names),
        "class_ids": list(p.class_ids),
        "input": {"shape": list(pool.input_shape), "range": [0, 1], "dtype": "float32"},
        "pool": p.pool,
        "experts": [f"{p.pool}/{t}" for t in p.tasks],
        "tasks": list(p.tasks),
        "execution": execution,
        "params": plan_params(pool, p),
        "sha256": weights_sha256_hex or weights_sha256(model),
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


def structure_key(state: dict[str, torch.Tensor]) -> tuple:
    """What a scripted ComposedModel's code depends on, read off its state dict.

    Two compositions with the same key differ only in tensor values and in shapes that TorchScript
    does not type (the number of kept classes, the column order), so one scripted module serves
    both. The key holds every tensor's name and the shapes of everything but the class-dependent
    tensors (the experts' linear layers and `order`).
    """
    return tuple((name, () if name == "order" or ".fc." in name else tuple(t.shape))
                 for name, t in sorted(state.items()))


class ScriptCache:
    """Scripted templates reused across compositions, so no request pays for `torch.jit.script`.

    `torch.jit.script` costs 0.1-0.2 s a call; swapping a new composition's tensors into an
    already scripted module of the same structure costs well under a millisecond, after which
    `torch.jit.save` (a few ms) is the only per-request cost. Each key keeps up to `copies`
    templates so that concurrent requests don't wait on each other's saves.
    """

    def __init__(self, copies: int = 4):
        self._copies = copies
        self._lock = threading.Lock()
        self._free: dict[tuple, queue.SimpleQueue] = {}
        self._made: dict[tuple, int] = {}
        self.scripted = 0  # how many times torch.jit.script ran (observability and tests)

    def _acquire(self, key: tuple, make_model: Callable[[], nn.Module]) -> torch.jit.ScriptModule:
        with self._lock:
            free = self._free.setdefault(key, queue.SimpleQueue())
            try:
                return free.get_nowait()
            except queue.Empty:
                make = self._made.get(key, 0) < self._copies
                if make:
                    self._made[key] = self._made.get(key, 0) + 1
                    self.scripted += 1
        if make:
            return script(make_model())
        return free.get()  # every copy is busy: wait for one

    def export(self, model: nn.Module, meta: dict) -> bytes:
        """TorchScript bytes of `model` with `meta` as poe.json."""
        return self.export_state(model.state_dict(), meta, lambda: model)

    def export_state(self, state: dict[str, torch.Tensor], meta: dict, make_model: Callable[[], nn.Module]) -> bytes:
        """TorchScript bytes of the model whose state dict is `state`; `make_model` builds one of
        the same structure and is called only when no scripted template exists yet."""
        key = structure_key(state)
        template = self._acquire(key, make_model)
        try:
            _swap_tensors(template, state)
            return to_torchscript_bytes(template, meta)
        finally:
            self._free[key].put(template)


def _swap_tensors(scripted: torch.jit.ScriptModule, state: dict[str, torch.Tensor]) -> None:
    for name, tensor in state.items():
        *path, attr = name.split(".")
        target = scripted
        for part in path:
            target = getattr(target, part)
        target._c.setattr(attr, tensor)
