"""Oracles an extraction can distil from, and the checks that they fit a data set.

Two kinds (both only ever produce logits; nothing is unpickled):

- a WideResNet state dict in safetensors with its `WRNConfig` (registered in the registry, or a
  file on the extractor);
- a TorchScript module (`torch.jit.load`), of any architecture: float32 [N, C, H, W] in [0, 1]
  in, [N, classes] logits out. TorchScript is code: only load files the operator trusts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from poe.engine.data import Dataset, to_float
from poe.engine.errors import DataLoss, InvalidArgument, field_error
from poe.engine.nets import WideResNet, WRNConfig
from poe.engine.pool import tensors_from_bytes, wrn_config_from_dict

ZIP_MAGIC = b"PK\x03\x04"
MAX_ORACLE_BYTES = 4 << 30


def is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == ZIP_MAGIC


def read_file(path: Path, field: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_ORACLE_BYTES:
            raise field_error(field, f"{path}: {size} bytes; oracles larger than {MAX_ORACLE_BYTES} are refused")
        return path.read_bytes()
    except FileNotFoundError:
        raise field_error(field, f"{path}: no such file on the extractor") from None
    except IsADirectoryError:
        raise field_error(field, f"{path}: is a directory, expected a TorchScript or safetensors file") from None
    except OSError as e:
        raise field_error(field, f"{path}: cannot read ({e.strerror})") from None


def wrn_config(config: dict, field: str) -> WRNConfig:
    try:
        return wrn_config_from_dict(config)
    except (InvalidArgument, ValueError, TypeError) as e:
        raise field_error(field, f"not a supported WideResNet config ({e})") from None


def _config_for_file(path: Path, config_json: str, field: str) -> dict:
    """The WRNConfig of a safetensors oracle: request, sidecar JSON, pool.json, file metadata."""
    if config_json:
        try:
            cfg = json.loads(config_json)
        except json.JSONDecodeError as e:
            raise field_error(f"{field}.config_json", f"not valid JSON ({e.msg})") from None
        if not isinstance(cfg, dict):
            raise field_error(f"{field}.config_json", "expected a JSON object")
        return cfg.get("config", cfg) if isinstance(cfg.get("config"), dict) else cfg
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text())
        except (json.JSONDecodeError, OSError):
            meta = None
        if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
            return meta["config"]
    manifest = path.parent / "pool.json"
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text())
            entry = m.get("oracle") or {}
            if entry.get("file") == path.name and isinstance(entry.get("config"), dict):
                return entry["config"]
        except (json.JSONDecodeError, OSError, AttributeError):
            pass
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if "poe.config" in meta:
            return json.loads(meta["poe.config"])
    except Exception:  # unreadable metadata: fall through to the error below
        pass
    raise field_error(f"{field}.config_json", f"{path.name}: a safetensors oracle needs its WideResNet config "
                                              f"(config_json, {sidecar.name} with a 'config' object, or metadata "
                                              "'poe.config')")


def load_wrn(cfg: WRNConfig, state: dict[str, torch.Tensor], what: str, field: str) -> WideResNet:
    model = WideResNet(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise field_error(field, f"{what} does not match WRN-{cfg.depth}-{cfg.width} with {cfg.num_classes} "
                                 f"classes ({detail})") from None
    return model.eval()


def read_wrn_file(path: Path, config_json: str, field: str) -> tuple[WRNConfig, WideResNet, bytes]:
    """A safetensors WideResNet from a file: (config, model, the file's bytes)."""
    data = read_file(path, field)
    try:
        state = tensors_from_bytes(data, what=str(path))
    except DataLoss:
        raise field_error(field, f"{path}: neither TorchScript nor a safetensors file") from None
    cfg = wrn_config(_config_for_file(path, config_json, field), f"{field}.config_json")
    return cfg, load_wrn(cfg, state, str(path), field), data


def load_torchscript(path: Path, field: str, device: str = "cpu") -> torch.jit.ScriptModule:
    from poe.engine.export import quiet_jit

    try:
        with quiet_jit():
            return torch.jit.load(str(path), map_location=device).eval()
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise field_error(field, f"{path}: not a TorchScript module (a torch.save checkpoint is not accepted; "
                                 f"export with torch.jit.script/trace, or save the state dict as safetensors): "
                                 f"{first}") from None


def check_wrn_fits(cfg: WRNConfig, data: Dataset, spec: str, field: str) -> None:
    c = data.input_shape[0]
    if cfg.num_classes != len(data.classes):
        raise field_error(field, f"class count mismatch: the oracle has {cfg.num_classes} classes but the data set "
                                 f"{spec} has {len(data.classes)}")
    if cfg.in_channels != c:
        raise field_error(field, f"the oracle takes {cfg.in_channels}-channel images but the data set {spec} has "
                                 f"{c} channel(s)")


@torch.no_grad()
def check_module_fits(model: nn.Module, data: Dataset, spec: str, field: str) -> int:
    """Run the oracle on two images of the data set; returns its number of classes."""
    x = to_float(data.images[:2])
    try:
        out = model(x)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise field_error(field, f"the oracle fails on images of shape {list(x.shape[1:])} from {spec}: "
                                 f"{first}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise field_error(field, f"the oracle must return logits [N, classes]; for {x.shape[0]} images it "
                                 f"returned {shape}")
    if out.shape[1] != len(data.classes):
        raise field_error(field, f"class count mismatch: the oracle has {out.shape[1]} classes but the data set "
                                 f"{spec} has {len(data.classes)}")
    return int(out.shape[1])
