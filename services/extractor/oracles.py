"""Oracles an extraction can distil from, and the checks that they fit a data set.

Two kinds, both only ever producing logits:

- weights: a safetensors state dict of an architecture from `poe.engine.architectures` (today
  the WideResNet family), with its config. Registered in the registry (which checks the upload),
  or a file in the extractor's oracle directory (registered when the job starts). The tensors
  must be exactly the architecture's; nothing is unpickled and nothing of the file is run.
- TorchScript: a module of any architecture, float32 [N, C, H, W] in [0, 1] in, [N, classes]
  logits out. Loading one runs its code, so it is accepted only from the extractor's oracle
  directory (POE_EXTRACTOR_ORACLE_DIR), which the operator fills and must trust; never from a
  client's bytes, never from the registry.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from poe.engine import architectures
from poe.engine.architectures import OracleConfig
from poe.engine.data import Dataset, to_float
from poe.engine.errors import DataLoss, InvalidArgument, field_error
from poe.engine.nets import WRNConfig
from poe.engine.pool import tensors_from_bytes, wrn_config_from_dict
from poe_services.extractor.files import MAX_SIDECAR_BYTES, InputFiles

ZIP_MAGIC = b"PK\x03\x04"


def wrn_config(config: dict, field: str) -> WRNConfig:
    """A library's (student's) WideResNet config."""
    try:
        return wrn_config_from_dict(config)
    except (InvalidArgument, ValueError, TypeError) as e:
        raise field_error(field, f"not a supported WideResNet config ({e})") from None


def oracle_config(config: object, field: str) -> OracleConfig:
    """An oracle's config: architecture name (default wideresnet) and its settings, within caps."""
    return architectures.parse_oracle_config(config, field)


def load_weights(oracle: OracleConfig, data: bytes, what: str, field: str) -> nn.Module:
    """The oracle module with `data` (safetensors bytes) as its weights: the file's tensors must
    be exactly the architecture's (names, shapes, dtypes)."""
    try:
        state = tensors_from_bytes(data, what=what)
    except DataLoss:
        raise field_error(field, f"{what}: {architectures.not_safetensors(data[:8])}") from None
    architectures.check_layout(architectures.tensor_layout(state), oracle, field, f"the weights of {what}")
    model = oracle.build()
    model.load_state_dict(state, strict=True)
    return model.eval()


def check_safetensors_header(data: bytes, what: str, field: str) -> None:
    """Refuse bytes that do not even start like a safetensors file (before their config is looked for)."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    if not 2 <= n <= architectures.MAX_HEADER_BYTES or len(data) < 8 + n or data[8:9] != b"{":
        raise field_error(field, f"{what}: {architectures.not_safetensors(data[:8])}")


def load_torchscript(data: bytes, what: str, field: str, device: str = "cpu") -> torch.jit.ScriptModule:
    """A TorchScript module from bytes the caller read from the oracle directory (runs its code)."""
    from poe.engine.export import quiet_jit

    try:
        with quiet_jit():
            return torch.jit.load(io.BytesIO(data), map_location=device).eval()
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise field_error(field, f"{what}: not a TorchScript module (a torch.save checkpoint is not accepted; "
                                 f"export with torch.jit.script/trace, or save the state dict as safetensors): "
                                 f"{first}") from None


def config_for_file(path: Path, data: bytes, config_json: str, field: str,
                    read_side: Callable[[Path], bytes | None]) -> dict:
    """The config of a safetensors oracle file, from the first of: `config_json`, `<stem>.json`
    beside the file ({"config": {...}}, what `poe train` writes), the pool.json of the pool
    directory holding it, the file's metadata `poe.config`. `read_side(path)` reads a side file
    (None when there is none): on the extractor under the same rules as the oracle file."""
    if config_json:
        if len(config_json) > MAX_SIDECAR_BYTES:
            raise field_error(f"{field}.config_json", f"{len(config_json)} characters; at most {MAX_SIDECAR_BYTES}")
        try:
            cfg = json.loads(config_json)
        except (json.JSONDecodeError, RecursionError) as e:
            raise field_error(f"{field}.config_json", f"not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(cfg, dict):
            raise field_error(f"{field}.config_json", "expected a JSON object")
        return cfg["config"] if isinstance(cfg.get("config"), dict) else cfg
    sidecar = path.with_suffix(".json")
    meta = _side_json(read_side, sidecar)
    if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
        return meta["config"]
    manifest = _side_json(read_side, path.parent / "pool.json")
    if isinstance(manifest, dict):
        entry = manifest.get("oracle")
        if isinstance(entry, dict) and entry.get("file") == path.name and isinstance(entry.get("config"), dict):
            return entry["config"]
    metadata = architectures.header_metadata(data)
    if "poe.config" in metadata:
        try:
            cfg = json.loads(metadata["poe.config"])
        except (json.JSONDecodeError, RecursionError):
            cfg = None
        if isinstance(cfg, dict):
            return cfg
    raise field_error(f"{field}.config_json", f"{path.name}: a safetensors oracle needs its config (config_json, "
                                              f"{sidecar.name} with a 'config' object, or metadata 'poe.config')")


def _side_json(read_side: Callable[[Path], bytes | None], path: Path) -> object:
    """A JSON file beside an oracle, or None when there is none (or it is not JSON)."""
    data = read_side(path)
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def side_reader(files: InputFiles, field: str) -> Callable[[Path], bytes | None]:
    """Reads an oracle's side files on the extractor: inside the oracle directory, regular, small."""
    def read(path: Path) -> bytes | None:
        if not path.exists():
            return None
        return files.read_oracle(str(path), field, MAX_SIDECAR_BYTES)[1]

    return read


def check_fits(oracle: OracleConfig, data: Dataset, spec: str, field: str) -> None:
    """The oracle's classes and input channels against the data set's."""
    c = data.input_shape[0]
    if oracle.num_classes != len(data.classes):
        raise field_error(field, f"class count mismatch: the oracle has {oracle.num_classes} classes but the data "
                                 f"set {spec} has {len(data.classes)}")
    if oracle.in_channels != c:
        raise field_error(field, f"the oracle takes {oracle.in_channels}-channel images but the data set {spec} has "
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
