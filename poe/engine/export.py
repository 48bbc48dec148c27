"""Composed model files: TorchScript with a `poe.json` extra file (the model-file contract and the
default), a torch.export program (pt2), ONNX, or safetensors.

A TorchScript file loads with plain torch, without this project installed::

    extra = {"poe.json": ""}
    model = torch.jit.load(path, _extra_files=extra)
    meta = json.loads(extra["poe.json"])   # classes, class_ids, input, pool, experts, params, sha256
    logits = model(x)                      # x: float32 [N, C, H, W] in [0, 1]

pt2 is the same with `torch.export.load(path, extra_files=extra).module()` (N dynamic); ONNX
(`poe.engine.onnx_export`) has input "images", output "logits" and poe.json in its metadata_props.

`sha256` in poe.json is the hash of the weights: the canonical safetensors serialisation of the
model's state dict (`poe.engine.pool.tensors_to_bytes`), so it identifies the function, not the container.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import queue
import threading
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from poe.engine.archive import ArchiveTemplate, TemplateError, probe_state, pt2_storage, tensor_layout
from poe.engine.compose import ComposedModel, Plan, build, plan_params
from poe.engine.errors import InvalidArgument
from poe.engine.onnx_export import EXPORT_LOCK, OnnxTemplate, export_onnx, is_onnx, load_onnx, to_onnx_bytes
from poe.engine.pool import Pool, sha256_hex, tensors_to_bytes

EXTRA_FILE = "poe.json"
FORMATS = ("torchscript", "pt2", "onnx", "safetensors")
TEMPLATED_FORMATS = ("torchscript", "pt2", "onnx")  # written from a per-layout template (ScriptCache)
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

    torchscript, pt2, onnx: the template of the state's tensor layout in that format, written with
    these tensors (`scripts` exports a template only for a format and layout it has not seen).
    safetensors: the tensors, with poe.json and the architecture (`spec`) in the header's metadata."""
    if fmt in TEMPLATED_FORMATS:
        fused = execution == "fused"
        template = scripts.template(state, lambda: build(pool, p, fused), fmt, pool.input_shape, architecture_key(pool))
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
    raise InvalidArgument(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")


def weights_sha256(model: nn.Module) -> str:
    return sha256_hex(tensors_to_bytes(model.state_dict()))


# torch.jit.script compiles each module class once and caches it on the class; two threads
# compiling the same class at once can fail ("Can't redefine method: forward on class ...").
_SCRIPT_LOCK = threading.Lock()


def script(model: ComposedModel) -> torch.jit.ScriptModule:
    with _SCRIPT_LOCK, quiet_jit():
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


def export_program(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> torch.export.ExportedProgram:
    """`torch.export` of `model` (eval mode) for inputs [N, *input_shape], N dynamic."""
    example = torch.zeros(2, *input_shape)  # 2, not 1: torch.export specialises a size-1 dimension
    with EXPORT_LOCK:
        return torch.export.export(model.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))


def to_pt2_bytes(model: nn.Module, meta: dict, input_shape: tuple[int, ...] | list[int]) -> bytes:
    """A fresh `torch.export.save` archive of `model` with `meta` as the extra file poe.json."""
    buf = io.BytesIO()
    torch.export.save(export_program(model, input_shape), buf,
                      extra_files={EXTRA_FILE: json.dumps(meta, sort_keys=True)})
    return buf.getvalue()


def load_pt2(source: str | Path | bytes, label: str = "model") -> tuple[nn.Module, dict]:
    """A pt2 composed model file and its poe.json: `torch.export.load(...).module()`."""
    extra = {EXTRA_FILE: ""}
    try:
        program = torch.export.load(io.BytesIO(source) if isinstance(source, bytes) else str(source),
                                    extra_files=extra)
    except (RuntimeError, ValueError, KeyError) as e:
        raise InvalidArgument(f"{label}: not a torch.export archive ({str(e).splitlines()[0][:120]})") from None
    if not extra[EXTRA_FILE]:
        raise InvalidArgument(f"{label}: pt2 archive without {EXTRA_FILE}; not a PoE model")
    return program.module(), json.loads(extra[EXTRA_FILE])


def model_format(data: bytes) -> str | None:
    """The format of a model file, from its content: a zip with `archive_format` "pt2" is a
    torch.export archive, a zip with `data.pkl` TorchScript, an 8-byte length then a JSON header
    safetensors, a protobuf with a graph ONNX; None for anything else."""
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                names = z.namelist()
                pt2 = [n for n in names if n.endswith("/archive_format")]
                if pt2 and z.read(pt2[0]).strip() == b"pt2":
                    return "pt2"
                return "torchscript" if any(n.endswith("/data.pkl") for n in names) else None
        except zipfile.BadZipFile:
            return None
    if len(data) > 9 and data[8:9] == b"{" and 8 + int.from_bytes(data[:8], "little") <= len(data):
        return "safetensors"
    return "onnx" if is_onnx(data) else None


def load_model(source: str | Path | bytes) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict, str]:
    """Any runnable composed model file (TorchScript, pt2 or ONNX, told apart by content): a callable
    from images [N, C, H, W] to logits [N, K], its poe.json and the format's name."""
    label = "model" if isinstance(source, bytes) else str(source)
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = Path(source).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise InvalidArgument(f"{source}: no such file") from None
    fmt = model_format(data)
    if fmt == "torchscript":
        model, meta = load_torchscript(data)
    elif fmt == "pt2":
        model, meta = load_pt2(data, label)
    elif fmt == "onnx":
        model, meta = load_onnx(data, label)
    elif fmt == "safetensors":
        raise InvalidArgument(f"{label}: a safetensors file holds weights only; compose it as torchscript, "
                              "pt2 or onnx to run it")
    else:
        raise InvalidArgument(f"{label}: not a model file (expected TorchScript, pt2 or ONNX)")
    return model, meta, fmt


def architecture_key(pool: Pool) -> tuple:
    """What a composed model's code depends on beyond its tensors' names and shapes: the stem's
    stride is a constant in the code, so pools that differ only there must not share a template."""
    return (pool.library_config.stem_stride,)


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
    """Compiled structure reused across compositions, so no request pays for TorchScript or export.

    Two levels, both keyed by what a composition's structure is, never by its class set:

    - a scripted module per `structure_key` (`torch.jit.script` costs 0.1-0.2 s a call);
    - a template per format and exact tensor layout (names, dtypes and shapes, the class-dependent
      ones included): the file torch wrote for that layout, from which a new composition's file is
      written by putting its tensors in place of the template's. For TorchScript (`ArchiveTemplate`)
      that costs about 1 ms where `torch.jit.save` costs 5-9 ms, and holds the GIL for less of it;
      pt2 (`ArchiveTemplate` over a `torch.export.save` archive) and ONNX (`OnnxTemplate`) templates
      spare `torch.export` and `torch.onnx.export`, which take 1-3 s a model.

    Each structure keeps up to `copies` scripted modules so that concurrent template saves don't
    wait on each other; templates (each about the size of one composed file) are kept, least
    recently used first out, within `max_template_bytes`; `on_bytes` hears the total. Concurrent
    requests for one missing template wait for a single export.
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
        self._templates: OrderedDict[tuple, Template] = OrderedDict()
        self._making: dict[tuple, threading.Lock] = {}
        self.scripted = 0  # how many times torch.jit.script ran (observability and tests)
        self.templated = 0  # how many templates were made (any format)

    def _acquire(self, key: tuple, make_model: Callable[[], nn.Module]) -> torch.jit.ScriptModule:
        while True:
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
                try:
                    return script(make_model())
                except BaseException:
                    with self._lock:  # give the copy slot back, or later callers would wait forever
                        self._made[key] -= 1
                    raise
            try:
                return free.get(timeout=0.5)  # every copy is busy: wait for one
            except queue.Empty:
                continue  # look again: a copy being made may have failed and freed its slot

    def has_template(self, state: dict[str, torch.Tensor], fmt: str = "torchscript",
                     input_shape: tuple[int, ...] | list[int] = (), variant: tuple = ()) -> bool:
        """Whether `template` would find the template of `state`'s layout in `fmt` without exporting."""
        key = (fmt, variant, () if fmt == "torchscript" else tuple(input_shape), tensor_layout(state))
        with self._lock:
            return key in self._templates

    def template(self, state: dict[str, torch.Tensor], make_model: Callable[[], nn.Module],
                 fmt: str = "torchscript", input_shape: tuple[int, ...] | list[int] = (),
                 variant: tuple = ()) -> Template:
        """The template for `state`'s exact layout in `fmt`, made once per format and layout.
        `input_shape` ([C, H, W]) fixes the exported input of pt2 and ONNX; `variant` names what
        the model's code depends on beyond its tensors (`architecture_key`)."""
        if fmt not in TEMPLATED_FORMATS:
            raise InvalidArgument(f"format: no template for {fmt!r} (expected one of {', '.join(TEMPLATED_FORMATS)})")
        layout = tensor_layout(state)
        key = (fmt, variant, () if fmt == "torchscript" else tuple(input_shape), layout)
        with self._lock:
            found = self._templates.get(key)
            if found is not None:
                self._templates.move_to_end(key)
                return found
            making = self._making.setdefault(key, threading.Lock())
        with making:
            with self._lock:
                found = self._templates.get(key)
                if found is not None:  # made by the request we waited for
                    self._templates.move_to_end(key)
                    return found
            if fmt == "torchscript":
                made = self._torchscript_template(state, make_model, layout, variant)
            else:
                made = _exported_template(state, make_model, fmt, tuple(input_shape), layout)
            with self._lock:
                self.templated += 1
                self._templates[key] = made
                self.template_bytes += made.nbytes
                while self.template_bytes > self.max_template_bytes and len(self._templates) > 1:
                    _, old = self._templates.popitem(last=False)
                    self.template_bytes -= old.nbytes
                self._making.pop(key, None)
                self._on_bytes(self.template_bytes)
        return made

    def _torchscript_template(self, state: dict[str, torch.Tensor], make_model: Callable[[], nn.Module],
                              layout: tuple, variant: tuple = ()) -> Template:
        key = (variant, structure_key(state))
        scripted = self._acquire(key, make_model)
        try:
            try:
                probe = probe_state(state)
                _swap_tensors(scripted, probe)
                return ArchiveTemplate.from_archive(to_torchscript_bytes(scripted, {}), probe, EXTRA_FILE)
            except TemplateError as e:  # e.g. empty or boolean tensors: save every time instead
                log.info("no archive template for this layout (%s): torch.jit.save per composition", e)
                made = _SavingTemplate(_jit_saver(scripted), layout)
                scripted = None  # the fallback owns it from now on: let another copy be scripted
                with self._lock:
                    self._made[key] -= 1
                return made
        finally:
            if scripted is not None:
                self._free[key].put(scripted)

    @property
    def full(self) -> bool:
        """Whether one more template would push an older one out."""
        return self.template_bytes >= self.max_template_bytes


def _exported_template(state: dict[str, torch.Tensor], make_model: Callable[[], nn.Module], fmt: str,
                       input_shape: tuple[int, ...], layout: tuple) -> Template:
    """A pt2 or ONNX template: the model exported once with probe tensors, whose places in the file
    tell where a composition's tensors go."""
    model = copy.deepcopy(make_model()).eval()  # the probe goes into a copy, never the caller's model
    save = to_pt2_bytes if fmt == "pt2" else to_onnx_bytes
    try:
        probe = probe_state(state)
        model.load_state_dict(probe)
        if fmt == "pt2":
            return ArchiveTemplate.from_archive(to_pt2_bytes(model, {}, input_shape), probe, EXTRA_FILE, pt2_storage)
        return OnnxTemplate.from_model(export_onnx(model, input_shape), probe)
    except TemplateError as e:
        log.info("no %s template for this layout (%s): exporting every composition", fmt, e)

        def export_each(s: dict[str, torch.Tensor], meta: dict) -> bytes:
            model.load_state_dict(s)
            return save(model, meta, input_shape)

        return _SavingTemplate(export_each, layout)


class _SavingTemplate:
    """The fallback for a layout that cannot be templated: put the tensors into a module and save
    or export it on every render (one at a time: it owns one module)."""

    nbytes = 0  # holds no file bytes

    def __init__(self, save: Callable[[dict[str, torch.Tensor], dict], bytes], layout: tuple):
        self._save, self._lock, self.layout = save, threading.Lock(), layout

    def views(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state

    def weights_sha256(self, state: dict[str, torch.Tensor]) -> str:
        return sha256_hex(tensors_to_bytes(state))

    def render(self, state: dict[str, torch.Tensor], meta: dict) -> bytes:
        with self._lock:
            return self._save(state, meta)


Template = ArchiveTemplate | OnnxTemplate | _SavingTemplate


def _jit_saver(scripted: torch.jit.ScriptModule) -> Callable[[dict[str, torch.Tensor], dict], bytes]:
    def save(state: dict[str, torch.Tensor], meta: dict) -> bytes:
        _swap_tensors(scripted, state)
        return to_torchscript_bytes(scripted, meta)

    return save


def _swap_tensors(scripted: torch.jit.ScriptModule, state: dict[str, torch.Tensor]) -> None:
    for name, tensor in state.items():
        *path, attr = name.split(".")
        target = scripted
        for part in path:
            target = getattr(target, part)
        target._c.setattr(attr, tensor)
