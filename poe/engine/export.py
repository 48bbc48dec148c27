"""Composed model files: TorchScript with a `poe.json` extra file (the model-file contract), or safetensors.

A file written here loads with plain torch, without this project installed::

    extra = {"poe.json": ""}
    model = torch.jit.load(path, _extra_files=extra)
    meta = json.loads(extra["poe.json"])   # classes, class_ids, input, pool, experts, params, sha256
    logits = model(x)                      # x: float32 [N, C, H, W] in [0, 1]

`sha256` in poe.json is the hash of the weights: the canonical safetensors serialisation of the
model's state dict (`poe.engine.pool.tensors_to_bytes`), so it identifies the function, not the container.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import queue
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from poe.engine.archive import ArchiveTemplate, TemplateError, probe_state, tensor_layout
from poe.engine.compose import ComposedModel, Plan, build, plan_params
from poe.engine.errors import InvalidArgument
from poe.engine.pool import Pool, sha256_hex, tensors_to_bytes

EXTRA_FILE = "poe.json"
log = logging.getLogger(__name__)


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
        "dataset": pool.hierarchy.dataset,
    }


def serialize(pool: Pool, p: Plan, state: dict[str, torch.Tensor], execution: str, fmt: str,
              scripts: ScriptCache) -> tuple[bytes, dict]:
    """The file of a composition and its poe.json, from its state (`compose.composed_state`).

    torchscript: the archive template of the state's tensor layout, written with these tensors
    (`scripts` scripts and saves a template only for a layout it has not seen). safetensors: the
    tensors, with poe.json and the architecture (`spec`) in the header's metadata."""
    if fmt == "torchscript":
        fused = execution == "fused"
        template = scripts.template(state, lambda: build(pool, p, fused))
        views = template.views(state)
        meta = metadata(pool, p, None, execution, template.weights_sha256(views))
        return template.render(views, meta), meta
    if fmt == "safetensors":
        from safetensors.torch import save as st_save

        meta = metadata(pool, p, None, execution, sha256_hex(tensors_to_bytes(state)))
        spec = {"execution": execution, "library": dataclasses.asdict(pool.library_config),
                "experts": [{"task": t, "config": dataclasses.asdict(pool.experts[t].config), "keep": list(k)}
                            for t, k in zip(p.tasks, p.keep, strict=True)],
                "class_ids": list(p.class_ids)}
        header = {EXTRA_FILE: json.dumps(meta, sort_keys=True), "spec": json.dumps(spec, sort_keys=True)}
        data = st_save({k: v.contiguous() for k, v in state.items()}, metadata=header)
        return data, meta
    raise InvalidArgument(f"format: expected torchscript or safetensors, got {fmt!r}")


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
    """Compiled structure reused across compositions, so no request pays for TorchScript.

    Two levels, both keyed by what a composition's structure is, never by its class set:

    - a scripted module per `structure_key` (`torch.jit.script` costs 0.1-0.2 s a call);
    - an `ArchiveTemplate` per exact tensor layout (names, dtypes and shapes, the class-dependent
      ones included): the archive `torch.jit.save` wrote for that layout, from which a new
      composition's file is written by putting its tensors in place of the template's. That costs
      about 1 ms where `torch.jit.save` costs 5-9 ms, and holds the GIL for less of it.

    Each structure keeps up to `copies` scripted modules so that concurrent template saves don't
    wait on each other; templates (each about the size of one composed file) are kept, least
    recently used first out, within `max_template_bytes`; `on_bytes` hears the total.
    """

    def __init__(self, copies: int = 4, max_template_bytes: int = 64 * 1024 * 1024,
                 on_bytes: Callable[[int], None] = lambda n: None):
        self._copies = copies
        self.max_template_bytes = max_template_bytes
        self.template_bytes = 0
        self._on_bytes = on_bytes
        self._lock = threading.Lock()
        self._free: dict[tuple, queue.SimpleQueue] = {}
        self._made: dict[tuple, int] = {}
        self._templates: OrderedDict[tuple, ArchiveTemplate | _SavingTemplate] = OrderedDict()
        self.scripted = 0  # how many times torch.jit.script ran (observability and tests)
        self.templated = 0  # how many archive templates were saved

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

    def template(self, state: dict[str, torch.Tensor],
                 make_model: Callable[[], nn.Module]) -> ArchiveTemplate | _SavingTemplate:
        """The archive template for `state`'s exact layout, saved once per layout."""
        layout = tensor_layout(state)
        with self._lock:
            found = self._templates.get(layout)
            if found is not None:
                self._templates.move_to_end(layout)
                return found
        key = structure_key(state)
        scripted = self._acquire(key, make_model)
        try:
            try:
                probe = probe_state(state)
                _swap_tensors(scripted, probe)
                made = ArchiveTemplate.from_archive(to_torchscript_bytes(scripted, {}), probe, EXTRA_FILE)
            except TemplateError as e:  # e.g. empty or boolean tensors: save every time instead
                log.info("no archive template for this layout (%s): torch.jit.save per composition", e)
                made = _SavingTemplate(scripted, layout)
                scripted = None  # the fallback owns it from now on: let another copy be scripted
                with self._lock:
                    self._made[key] -= 1
        finally:
            if scripted is not None:
                self._free[key].put(scripted)
        with self._lock:
            self.templated += 1
            if layout not in self._templates:
                self._templates[layout] = made
                self.template_bytes += made.nbytes
            while self.template_bytes > self.max_template_bytes and len(self._templates) > 1:
                _, old = self._templates.popitem(last=False)
                self.template_bytes -= old.nbytes
            self._on_bytes(self.template_bytes)
        return made

    @property
    def full(self) -> bool:
        """Whether one more template would push an older one out."""
        return self.template_bytes >= self.max_template_bytes


class _SavingTemplate:
    """The fallback for a layout `poe.engine.archive` cannot template: swap the tensors into a scripted
    module and `torch.jit.save` it on every render (one at a time: it owns one scripted module)."""

    nbytes = 0  # holds no archive bytes

    def __init__(self, scripted: torch.jit.ScriptModule, layout: tuple):
        self._scripted, self._lock, self.layout = scripted, threading.Lock(), layout

    def views(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state

    def weights_sha256(self, state: dict[str, torch.Tensor]) -> str:
        return sha256_hex(tensors_to_bytes(state))

    def render(self, state: dict[str, torch.Tensor], meta: dict) -> bytes:
        with self._lock:
            _swap_tensors(self._scripted, state)
            return to_torchscript_bytes(self._scripted, meta)


def _swap_tensors(scripted: torch.jit.ScriptModule, state: dict[str, torch.Tensor]) -> None:
    for name, tensor in state.items():
        *path, attr = name.split(".")
        target = scripted
        for part in path:
            target = getattr(target, part)
        target._c.setattr(attr, tensor)
