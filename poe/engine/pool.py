"""The pool: library, experts (and, for evaluation, the oracle) with their metadata.

On disk a pool is a directory::

    pool.json                 manifest (format poe.pool/v1): configs, sha256 of every file, metrics
    hierarchy.yaml            the primitive tasks
    library.safetensors       Library state dict (normalisation, stem, groups 1-2)
    experts/<task>.safetensors  one Head state dict per primitive task
    oracle.safetensors        the oracle (optional; used by `poe eval` and the benchmarks)

Weights are safetensors only (nothing is unpickled) and every file's sha256 is checked on read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from safetensors.numpy import save as np_save
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from poe.engine import hierarchy as hierarchy_mod
from poe.engine.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from poe.engine.hierarchy import Hierarchy
from poe.engine.manifest import FORMAT, MANIFEST, read_manifest
from poe.engine.nets import ExpertConfig, Head, Library, WideResNet, WRNConfig, count_params, make_expert


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensors_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """Canonical safetensors bytes of a state dict (contiguous CPU tensors, sorted keys)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in sorted(state.items())}
    if all(t.dtype in _NUMPY_DTYPES for t in tensors.values()):
        # The same bytes as safetensors.torch.save, about 6x faster: that one checks every tensor
        # for shared storage and converts them one by one (2-3 ms for a composed model).
        return np_save({k: t.numpy() for k, t in tensors.items()})
    return st_save(tensors)


_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.int16,
                 torch.int8, torch.uint8, torch.bool)


def tensors_from_bytes(data: bytes, expected_sha256: str | None = None, what: str = "blob") -> dict[str, torch.Tensor]:
    if expected_sha256 is not None and sha256_hex(data) != expected_sha256:
        raise DataLoss(f"{what}: sha256 mismatch (expected {expected_sha256[:12]}..., got {sha256_hex(data)[:12]}...)")
    try:
        return st_load(data)
    except Exception as e:  # safetensors raises its own error types
        raise DataLoss(f"{what}: not a valid safetensors file ({e})") from None


def _config_from_dict(cls, d: dict, what: str, tuples: tuple[str, ...] = ()):
    """A config dataclass from a JSON object: unknown keys, wrong types and sizes beyond the caps of
    `poe.engine.limits` are InvalidArgument, raised before any module is built."""
    if not isinstance(d, dict):
        raise InvalidArgument(f"bad {what} config: expected a JSON object, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in d if k not in known)
    if unknown:
        raise InvalidArgument(f"bad {what} config: unknown keys {', '.join(unknown[:10])}")
    d = dict(d)
    for k in tuples:
        if k in d:
            if not isinstance(d[k], list | tuple) or not all(isinstance(v, int | float) for v in d[k]):
                raise InvalidArgument(f"bad {what} config: {k} must be a list of numbers")
            d[k] = tuple(d[k])
    try:
        return cls(**d)
    except (TypeError, ValueError) as e:  # InvalidArgument (the caps) is a ValueError too
        raise InvalidArgument(f"bad {what} config: {e}") from None


def wrn_config_from_dict(d: dict) -> WRNConfig:
    # An oracle's registered config may name its architecture (the only one a WRNConfig describes).
    if isinstance(d, dict) and d.get("architecture", "wideresnet") == "wideresnet":
        d = {k: v for k, v in d.items() if k != "architecture"}
    return _config_from_dict(WRNConfig, d, "network", ("mean", "std"))


def expert_config_from_dict(d: dict) -> ExpertConfig:
    return _config_from_dict(ExpertConfig, d, "expert")


def config_to_dict(cfg) -> dict:
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


@dataclass
class Expert:
    task: str
    class_ids: tuple[int, ...]  # in the expert's output order
    config: ExpertConfig
    state: dict[str, torch.Tensor]
    metrics: dict = field(default_factory=dict)  # e.g. {"val_acc": 0.97}
    loss: dict = field(default_factory=lambda: {"temperature": 4.0, "soft_weight": 1.0, "scale_weight": 0.3})

    def module(self) -> Head:
        m = make_expert(self.config)
        m.load_state_dict(self.state)
        return m.eval()

    @property
    def params(self) -> int:
        return sum(v.numel() for k, v in self.state.items() if not _is_buffer_key(k))


def _is_buffer_key(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked")) or key.startswith("norm.")


@dataclass
class Pool:
    name: str
    version: str
    hierarchy: Hierarchy
    library_config: WRNConfig  # the student the library was cut from
    library_state: dict[str, torch.Tensor]
    experts: dict[str, Expert]  # task name -> expert, hierarchy order
    oracle_config: WRNConfig | None = None
    oracle_state: dict[str, torch.Tensor] | None = None
    info: dict = field(default_factory=dict)  # training provenance, metrics

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """[C, H, W] of the images the pool takes, as its info records it (`info.input_shape`)."""
        shape = self.info.get("input_shape")
        if not (isinstance(shape, list | tuple) and len(shape) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
            raise FailedPrecondition(f"pool {self.ref} records no input shape: its info needs input_shape "
                                     f"[channels, height, width] of the images its library was trained on, "
                                     f"got {shape!r}")
        if shape[0] != self.library_config.in_channels:
            raise FailedPrecondition(f"pool {self.ref}: info.input_shape {list(shape)} has {shape[0]} channel(s) "
                                     f"but its library takes {self.library_config.in_channels}")
        return tuple(shape)  # type: ignore[return-value]

    def library(self) -> Library:
        lib = Library(self.library_config)
        lib.load_state_dict(self.library_state)
        return lib.eval()

    def oracle(self) -> WideResNet:
        if self.oracle_state is None or self.oracle_config is None:
            raise NotFound(f"pool {self.ref} ships no oracle")
        m = WideResNet(self.oracle_config)
        m.load_state_dict(self.oracle_state)
        return m.eval()

    @property
    def library_params(self) -> int:
        return sum(v.numel() for k, v in self.library_state.items() if not _is_buffer_key(k))


def library_state_from_student(student: WideResNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in student.library.state_dict().items()}


def save(pool: Pool, directory: str | Path) -> Path:
    """Write the pool directory; files are written to temporaries and renamed into place."""
    directory = Path(directory)
    (directory / "experts").mkdir(parents=True, exist_ok=True)

    def write(rel: str, data: bytes) -> dict:
        path = directory / rel
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return {"file": rel, "sha256": sha256_hex(data), "bytes": len(data)}

    manifest: dict = {"format": FORMAT, "name": pool.name, "version": pool.version,
                      "hierarchy": "hierarchy.yaml", "info": pool.info}
    (directory / "hierarchy.yaml").write_text(pool.hierarchy.dump())
    manifest["library"] = {**write("library.safetensors", tensors_to_bytes(pool.library_state)),
                           "student_config": config_to_dict(pool.library_config),
                           "params": pool.library_params}
    manifest["experts"] = []
    for task, e in pool.experts.items():
        manifest["experts"].append({
            "task": task, "class_ids": list(e.class_ids), "config": config_to_dict(e.config),
            "params": e.params, "metrics": e.metrics, "loss": e.loss,
            **write(f"experts/{task}.safetensors", tensors_to_bytes(e.state))})
    if pool.oracle_state is not None and pool.oracle_config is not None:
        manifest["oracle"] = {**write("oracle.safetensors", tensors_to_bytes(pool.oracle_state)),
                              "config": config_to_dict(pool.oracle_config),
                              "params": count_params(WideResNet(pool.oracle_config))}
    tmp = directory / "pool.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, directory / "pool.json")
    return directory


def load(directory: str | Path, with_oracle: bool = True) -> Pool:
    directory = Path(directory)
    m = read_manifest(directory)

    def read(entry: dict) -> dict[str, torch.Tensor]:
        path = directory / entry["file"]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{path}: missing") from None
        return tensors_from_bytes(data, entry["sha256"], str(path))

    hier = hierarchy_mod.load(directory / m["hierarchy"])
    experts = {}
    for e in m["experts"]:
        experts[e["task"]] = Expert(e["task"], tuple(e["class_ids"]), expert_config_from_dict(e["config"]), read(e),
                                    e.get("metrics", {}), e.get("loss", {}))
    unknown = [t for t in experts if t not in hier.tasks]
    if unknown:
        raise InvalidArgument(f"{directory / MANIFEST}: experts for tasks not in the hierarchy: {', '.join(unknown)}")
    oracle_cfg = oracle_state = None
    if with_oracle and "oracle" in m:
        oracle_cfg, oracle_state = wrn_config_from_dict(m["oracle"]["config"]), read(m["oracle"])
    return Pool(m["name"], str(m["version"]), hier, wrn_config_from_dict(m["library"]["student_config"]),
                read(m["library"]), {t: experts[t] for t in hier.tasks if t in experts},
                oracle_cfg, oracle_state, m.get("info", {}))

