"""The network architectures an oracle may arrive as: weights in safetensors, never a program.

An oracle is a safetensors state dict plus a JSON config that names its architecture
(`"architecture"`, "wideresnet" when absent) and that architecture's settings. Nothing in an
upload is ever run: the name picks a module builder from `ARCHITECTURES`, the settings are checked
against caps before anything is built, and the file's tensors must be exactly the ones that
module's state dict holds (names, shapes, dtypes). TorchScript, torch.export and torch.save files
are zip archives or pickles, not safetensors, so they are refused before a byte of them is used.

The table is small and explicit; adding an architecture means adding its parser (with caps), the
tensors it expects (computed from the config, without building the module) and its builder.

This module imports no torch at import time: the registry checks uploads without torch, and only
`OracleConfig.build` imports the network code.
"""

from __future__ import annotations

import contextlib
import math
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from poe.engine import limits
from poe.engine.errors import field_error

if TYPE_CHECKING:
    from torch import nn

DEFAULT_ARCHITECTURE = "wideresnet"
# A safetensors header names every tensor with its dtype, shape and offsets: about 100 bytes per
# tensor (a WRN-40-10 has 300 tensors), so 1 MiB is far more than any supported network needs.
MAX_HEADER_BYTES = 1 << 20

ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT = ("F32",)
# BatchNorm's num_batches_tracked: torch keeps it as int64; `poe train` writes every tensor as float32.
COUNTER = ("I64", "F32")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor an architecture's state dict holds: its shape and the dtypes accepted for it."""

    shape: tuple[int, ...]
    dtypes: tuple[str, ...] = FLOAT

    @property
    def max_bytes(self) -> int:
        return math.prod(self.shape) * max(ITEM_BYTES[d] for d in self.dtypes)

    def __str__(self) -> str:
        return f"{'/'.join(self.dtypes)}{list(self.shape)}"


@dataclass(frozen=True)
class Architecture:
    """An entry of the table: how to read its settings and what its weights must look like."""

    name: str
    parse: Callable[[Mapping, str], dict]  # (settings, field) -> complete settings, caps checked
    tensors: Callable[[dict], dict[str, TensorSpec]]  # complete settings -> the state dict's layout
    build: Callable[[dict], nn.Module]  # complete settings -> a module (imports torch)
    describe: Callable[[dict], str]
    in_channels: Callable[[dict], int]
    num_classes: Callable[[dict], int]


@dataclass(frozen=True)
class OracleConfig:
    """An oracle's architecture with its checked, complete settings."""

    architecture: Architecture
    settings: dict

    @property
    def name(self) -> str:
        return self.architecture.name

    def tensors(self) -> dict[str, TensorSpec]:
        return self.architecture.tensors(self.settings)

    def build(self) -> nn.Module:
        return self.architecture.build(self.settings)

    def describe(self) -> str:
        return self.architecture.describe(self.settings)

    @property
    def in_channels(self) -> int:
        return self.architecture.in_channels(self.settings)

    @property
    def num_classes(self) -> int:
        return self.architecture.num_classes(self.settings)

    def max_file_bytes(self) -> int:
        """The largest safetensors file these weights can take (header included)."""
        return 8 + MAX_HEADER_BYTES + sum(t.max_bytes for t in self.tensors().values())

    def to_dict(self) -> dict:
        """The config as stored with the oracle; the default architecture is left implicit, so that
        the stored config stays the plain `WRNConfig` fields older readers expect."""
        if self.name == DEFAULT_ARCHITECTURE:
            return dict(self.settings)
        return {"architecture": self.name, **self.settings}


# -- Wide-ResNet (poe.engine.nets.WideResNet) ---------------------------------------------------------

# WRNConfig's defaults (a test checks that they agree with poe.engine.nets).
WRN_DEFAULTS = {"depth": 16, "width": 1, "in_channels": 1, "num_classes": 10, "stem_stride": 1, "dropout": 0.0,
                "mean": [0.2860], "std": [0.3530]}


def _int_in(field: str, settings: Mapping, key: str, lo: int, hi: int) -> int:
    value = settings[key]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise field_error(field, f"{key} must be an integer in [{lo}, {hi}], got {limits.quote(value)}")
    return value


def _numbers(field: str, settings: Mapping, key: str, count: int, positive: bool) -> list[float]:
    value = settings[key]
    if not isinstance(value, list | tuple) or len(value) != count:
        raise field_error(field, f"{key} must list {count} number(s), one per input channel, got {limits.quote(value)}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or (positive and v <= 0):
            raise field_error(field, f"{key} must hold finite{' positive' if positive else ''} numbers, got "
                                     f"{limits.quote(v)}")
    return [float(v) for v in value]


def parse_wideresnet(settings: Mapping, field: str) -> dict:
    unknown = sorted(set(settings) - set(WRN_DEFAULTS))
    if unknown:
        raise field_error(field, f"unknown WideResNet setting(s) {limits.listing(map(limits.quote, unknown))} "
                                 f"(known: {', '.join(WRN_DEFAULTS)})")
    s = {**WRN_DEFAULTS, **settings}
    depth = _int_in(field, s, "depth", 10, limits.MAX_WRN_DEPTH)
    if (depth - 4) % 6:
        raise field_error(field, f"depth must be 6n + 4 (10, 16, 22, 28, 34, 40), got {depth}")
    out = {"depth": depth, "width": _int_in(field, s, "width", 1, limits.MAX_WRN_WIDTH),
           "in_channels": _int_in(field, s, "in_channels", 1, limits.MAX_IN_CHANNELS),
           "num_classes": _int_in(field, s, "num_classes", 1, limits.MAX_CLASSES),
           "stem_stride": _int_in(field, s, "stem_stride", 1, 2)}
    dropout = s["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
        raise field_error(field, f"dropout must be a number in [0, 1), got {limits.quote(dropout)}")
    out["dropout"] = float(dropout)
    out["mean"] = _numbers(field, s, "mean", out["in_channels"], positive=False)
    out["std"] = _numbers(field, s, "std", out["in_channels"], positive=True)
    return out


def _batch_norm(prefix: str, channels: int) -> dict[str, TensorSpec]:
    return {f"{prefix}.weight": TensorSpec((channels,)), f"{prefix}.bias": TensorSpec((channels,)),
            f"{prefix}.running_mean": TensorSpec((channels,)), f"{prefix}.running_var": TensorSpec((channels,)),
            f"{prefix}.num_batches_tracked": TensorSpec((), COUNTER)}


def _group(prefix: str, cin: int, cout: int, blocks: int, stride: int) -> dict[str, TensorSpec]:
    """nets.make_group: pre-activation blocks, a 1x1 shortcut where the shape changes."""
    out: dict[str, TensorSpec] = {}
    for i in range(blocks):
        b_in, b_stride = (cin, stride) if i == 0 else (cout, 1)
        p = f"{prefix}.{i}"
        out.update(_batch_norm(f"{p}.bn1", b_in))
        out[f"{p}.conv1.weight"] = TensorSpec((cout, b_in, 3, 3))
        out.update(_batch_norm(f"{p}.bn2", cout))
        out[f"{p}.conv2.weight"] = TensorSpec((cout, cout, 3, 3))
        if b_stride != 1 or b_in != cout:
            out[f"{p}.shortcut.weight"] = TensorSpec((cout, b_in, 1, 1))
    return out


def wideresnet_tensors(s: dict) -> dict[str, TensorSpec]:
    """The state dict of nets.WideResNet(WRNConfig(**s)): library (normalisation, stem, groups 1-2)
    and head (group 3, BN, linear)."""
    c, n, w, k = s["in_channels"], (s["depth"] - 4) // 6, s["width"], s["num_classes"]
    c0, c1, c2, c3 = 16, 16 * w, 32 * w, 64 * w
    out = {"library.norm.mean": TensorSpec((1, c, 1, 1)), "library.norm.std": TensorSpec((1, c, 1, 1)),
           "library.stem.weight": TensorSpec((c0, c, 3, 3))}
    out.update(_group("library.group1", c0, c1, n, 1))
    out.update(_group("library.group2", c1, c2, n, 2))
    out.update(_group("head.group", c2, c3, n, 2))
    out.update(_batch_norm("head.bn", c3))
    out["head.fc.weight"] = TensorSpec((k, c3))
    out["head.fc.bias"] = TensorSpec((k,))
    return out


def build_wideresnet(s: dict) -> nn.Module:
    from poe.engine.nets import WideResNet, WRNConfig

    return WideResNet(WRNConfig(**{**s, "mean": tuple(s["mean"]), "std": tuple(s["std"])}))


ARCHITECTURES: dict[str, Architecture] = {
    "wideresnet": Architecture(
        name="wideresnet", parse=parse_wideresnet, tensors=wideresnet_tensors, build=build_wideresnet,
        describe=lambda s: f"WRN-{s['depth']}-{s['width']} with {s['in_channels']} input channel(s) and "
                           f"{s['num_classes']} classes",
        in_channels=lambda s: s["in_channels"], num_classes=lambda s: s["num_classes"]),
}


def parse_oracle_config(config: object, field: str = "config_json") -> OracleConfig:
    """An oracle's config: `architecture` (default "wideresnet") and that architecture's settings,
    every one checked against its caps. InvalidArgument naming `field` otherwise."""
    if not isinstance(config, Mapping):
        raise field_error(field, f"expected a JSON object, got {type(config).__name__}")
    settings = dict(config)
    name = settings.pop("architecture", DEFAULT_ARCHITECTURE)
    arch = ARCHITECTURES.get(name) if isinstance(name, str) else None
    if arch is None:
        raise field_error(field, f"architecture {limits.quote(name)} is not known; known: {', '.join(ARCHITECTURES)}")
    return OracleConfig(arch, arch.parse(settings, field))


# -- checking weights against the layout ------------------------------------------------------------

Layout = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (safetensors dtype, shape)


def check_layout(found: Layout, oracle: OracleConfig, field: str, what: str = "the weights") -> None:
    """The tensors must be exactly the ones the architecture's state dict holds."""
    expected = oracle.tensors()
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k} is {dtype}{list(shape)}, expected {expected[k]}" for k, (dtype, shape) in sorted(found.items())
             if k in expected and (tuple(shape) != expected[k].shape or dtype not in expected[k].dtypes)]
    problems = ([f"missing {limits.listing(missing)}"] if missing else []) + \
               ([f"unexpected {limits.listing(unexpected)}"] if unexpected else []) + \
               ([limits.listing(wrong, limit=3, sep="; ")] if wrong else [])
    if problems:
        raise field_error(field, f"{what} do not match {oracle.describe()}: {'; '.join(problems)}")


def not_safetensors(prefix: bytes) -> str:
    """Why bytes starting with `prefix` are not a safetensors file, naming the usual mistakes."""
    if prefix.startswith(b"PK\x03\x04"):
        return ("a zip archive (TorchScript, torch.export or torch.save): programs and pickles are never "
                "accepted; send the state dict as safetensors")
    if prefix[:1] == b"\x80":
        return "a pickle (torch.save): pickles are never accepted; send the state dict as safetensors"
    return "not a safetensors file"


def header_length(prefix: bytes, field: str) -> int:
    """The JSON header's length from the first 8 bytes of a safetensors file."""
    (n,) = struct.unpack("<Q", prefix[:8])
    if not 2 <= n <= MAX_HEADER_BYTES:
        raise field_error(field, not_safetensors(prefix))
    return n


def file_layout(path: str, field: str) -> Layout:
    """Names, dtypes and shapes of a safetensors file, read by safetensors' own parser (which also
    checks every tensor's offsets against the file); no tensor is loaded."""
    try:
        with safe_open(path, framework="np") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise field_error(field, f"not a valid safetensors file ({reason})") from None


@contextlib.contextmanager
def stand_in(header: bytes, size: int) -> Iterator[str]:
    """The path of a sparse file of `size` bytes that starts with `header` (a safetensors length
    field and JSON header). What safetensors checks when it opens a file (names, dtypes, shapes,
    offsets against the file size) and its metadata do not depend on the tensors' bytes, so this
    file stands in for the real one: safetensors' own parser checks a header without the weights
    being copied or loaded."""
    with tempfile.NamedTemporaryFile(prefix="poe-oracle-", suffix=".safetensors") as f:
        f.write(header)
        f.truncate(size)
        f.flush()
        yield f.name


def header_layout(header: bytes, size: int, field: str) -> Layout:
    """The layout of a safetensors file of `size` bytes that starts with `header`."""
    with stand_in(header, size) as path:
        return file_layout(path, field)


def header_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes ({} when there is none or the bytes are no safetensors)."""
    if len(data) < 8:
        return {}
    (n,) = struct.unpack("<Q", data[:8])
    if not 2 <= n <= MAX_HEADER_BYTES or len(data) < 8 + n:
        return {}
    try:
        with stand_in(data[:8 + n], len(data)) as path, safe_open(path, framework="np") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return {}


def check_oracle_upload(config: object, chunks: Iterable[bytes], *, config_field: str = "config_json",
                        field: str = "chunk") -> Iterator[bytes]:
    """Pass an oracle upload's chunks through, checking them on the way: the config now (before a
    byte is read), the size as the bytes arrive (never more than the architecture's weights can
    take), and at the end the safetensors header against the architecture's tensors. Anything
    else (TorchScript, a pickle, random bytes) raises InvalidArgument naming `field`; raised inside
    the iteration, it makes the caller drop what it staged."""
    oracle = parse_oracle_config(config, config_field)
    return _checked_chunks(oracle, chunks, field)


def _checked_chunks(oracle: OracleConfig, chunks: Iterable[bytes], field: str) -> Iterator[bytes]:
    limit = oracle.max_file_bytes()
    keep = 8 + MAX_HEADER_BYTES
    prefix = bytearray()  # the first bytes: the length field and (at most) the largest header allowed
    header_end: int | None = None
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise field_error(field, f"more than {limit} bytes: larger than the safetensors weights of "
                                     f"{oracle.describe()} can be")
        if len(prefix) < keep:
            prefix += chunk[:keep - len(prefix)]
        if header_end is None and len(prefix) >= 8:
            header_end = 8 + header_length(bytes(prefix[:8]), field)  # a zip or a pickle stops here
        yield chunk
    if header_end is None:
        raise field_error(field, not_safetensors(bytes(prefix)) if prefix else "empty upload")
    if len(prefix) < header_end:
        raise field_error(field, "not a valid safetensors file (the upload ends inside its header)")
    check_layout(header_layout(bytes(prefix[:header_end]), total, field), oracle, field, "the uploaded weights")


def safetensors_dtype(dtype: Any) -> str:
    """A torch dtype's safetensors name (F32, I64, ...)."""
    import torch

    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
    return names.get(dtype, str(dtype))


def tensor_layout(state: Mapping[str, Any]) -> Layout:
    """The layout of tensors already in memory (a loaded state dict)."""
    return {k: (safetensors_dtype(t.dtype), tuple(t.shape)) for k, t in state.items()}


def placeholder_weights(config: object, seed: int = 0) -> bytes:
    """Safetensors bytes with exactly the layout `config`'s architecture expects, filled with random
    values from `seed` (counters 0): weights that pass every upload check, for exercising storage
    and transfers in tests and smoke checks. Not a trained network."""
    import numpy as np
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    state = {}
    for name, spec in parse_oracle_config(config).tensors().items():
        if name.endswith("running_var"):  # positive, so that the module computes finite numbers
            state[name] = np.abs(rng.standard_normal(spec.shape, dtype=np.float32)) + 0.5
        elif spec.dtypes[0] == "F32":
            state[name] = rng.standard_normal(spec.shape, dtype=np.float32)
        else:
            state[name] = np.zeros(spec.shape, dtype=np.int64)
    return save(dict(sorted(state.items())))
