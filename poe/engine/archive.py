"""Zip archives written from a template: a new composition's file without `torch.jit.save` or
`torch.export.save`.

A TorchScript file is a zip archive of stored records: code, `data.pkl` (the module tree, which
points at tensor storages by key), one `data/<key>` record per storage, and extra files. A
`torch.export` (pt2) archive is written by the same zip writer: the graph as JSON, one
`data/weights/weight_<i>` record per parameter or buffer, and extra files. Two composed models of
the same structure and tensor layout (names, dtypes, shapes) differ only in the bytes of those
storages and in `poe.json`. An `ArchiveTemplate` is made once per layout from an archive that torch
wrote for probe tensors whose values are all distinct, which tells which record holds which
tensor; `render` then lays out the same records with another state's bytes. The record payloads
are byte for byte those `torch.jit.save` writes for that state (a test checks it), and data starts
on 64-byte boundaries as in torch's own writer.

The same template gives the weights' sha256 (the hash of `poe.engine.pool.tensors_to_bytes(state)`, the
canonical safetensors bytes) from the header it precomputes for the layout, without building them.

Per composition this costs a copy of the template, a CRC per tensor and the sha256: about 0.5 ms
for a 0.5 MB model here, where `torch.jit.save` takes 4-9 ms and holds the GIL throughout.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from poe.engine.pool import tensors_to_bytes

_LOCAL = struct.Struct("<IHHHHHIIIHH")  # local file header, then name and extra field
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory entry, then name and extra field
_END = struct.Struct("<IHHHHIIH")  # end of central directory record
_ALIGN = 64  # torch's zip writer starts every record's data on a 64-byte boundary
_DOS_DATE = (0, 0x21)  # 1980-01-01 00:00, what torch writes
_VERSION = 20


class TemplateError(ValueError):
    """The layout cannot be templated (the caller falls back to saving every composition)."""


def torchscript_storage(name: str) -> bool:
    """Whether a TorchScript archive's record is a tensor storage: `<archive>/data/<key>`."""
    return name.split("/")[-2:-1] == ["data"]


def pt2_storage(name: str) -> bool:
    """Whether a `torch.export.save` archive's record is a tensor: a weight, or anything but the
    config among the constants (a non-tensor constant then fails the probe match: no template)."""
    return "/data/weights/weight_" in name or ("/data/constants/" in name and not name.endswith(".json"))


def tensor_layout(state: dict[str, torch.Tensor]) -> tuple:
    """Names, dtypes and shapes of a state dict: what an archive template is keyed by."""
    return tuple((name, str(t.dtype), tuple(t.shape)) for name, t in sorted(state.items()))


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes as both TorchScript and safetensors store them (contiguous, little-endian
    on this platform), without copying when the tensor is already contiguous."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    try:
        return memoryview(t.numpy() if t.dim() else t.reshape(1).numpy()).cast("B")
    except TypeError:  # a dtype numpy lacks (bfloat16): reinterpret the bytes instead
        return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def probe_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors of `state`'s layout whose values are all distinct (1, 2, 3, ... across tensors)."""
    probe, start = {}, 1
    for name, t in sorted(state.items()):
        if t.numel() == 0 or not (t.dtype.is_floating_point or t.dtype in (torch.int32, torch.int64)):
            raise TemplateError(f"tensor {name}: {t.dtype} with {t.numel()} elements cannot be probed")
        probe[name] = torch.arange(start, start + t.numel(), dtype=torch.float64).reshape(t.shape).to(t.dtype)
        start += t.numel()
    if start > 2 ** 24 and any(t.dtype.is_floating_point for t in state.values()):
        raise TemplateError(f"{start - 1} elements: too many for float32 probes to stay distinct")
    return probe


@dataclass(frozen=True)
class _Slot:
    """Where one tensor goes: its bytes in the local records and its CRC in both headers."""

    name: str
    offset: int
    size: int
    local_crc: int
    central_crc: int


class WeightsDigest:
    """sha256 of the canonical safetensors bytes (`poe.engine.pool.tensors_to_bytes`) of any state
    of one layout, from the header precomputed for that layout and the tensors' bytes."""

    def __init__(self, probe: dict[str, torch.Tensor]):
        self._header, self._order = _safetensors_layout(probe)

    @property
    def nbytes(self) -> int:
        return len(self._header)

    def hexdigest(self, views: dict[str, memoryview]) -> str:
        h = hashlib.sha256(self._header)
        for name in self._order:
            h.update(views[name])
        return h.hexdigest()


def matching_probe(probe: dict[str, torch.Tensor]) -> dict[bytes, str]:
    """Probe tensor names by their bytes: how a template finds where each tensor went."""
    by_bytes = {bytes(tensor_bytes(t)): name for name, t in probe.items()}
    if len(by_bytes) != len(probe):
        raise TemplateError("probe tensors are not distinct")
    return by_bytes


class ArchiveTemplate:
    def __init__(self, layout: tuple, body: bytes, central: bytes, entries: int, slots: list[_Slot],
                 extra_name: str, digest: WeightsDigest):
        self.layout = layout
        self._body, self._central, self._entries, self._slots = body, central, entries, slots
        self._extra_name = extra_name.encode()
        self._digest = digest

    @classmethod
    def from_archive(cls, archive: bytes, probe: dict[str, torch.Tensor], extra_file: str,
                     storage: Callable[[str], bool] = torchscript_storage) -> ArchiveTemplate:
        """A template from the archive torch wrote for a module holding `probe`; `storage` tells
        which records hold tensors (TorchScript's by default, `pt2_storage` for torch.export's)."""
        by_bytes = matching_probe(probe)
        body, central = bytearray(), bytearray()
        slots, found, extra_name, entries = [], set(), None, 0
        with zipfile.ZipFile(io.BytesIO(archive)) as z:
            for info in z.infolist():
                payload, folder = z.read(info), info.filename.split("/")[-2:-1]
                if folder == ["extra"] and info.filename.endswith("/" + extra_file):
                    extra_name = info.filename  # written last, by render
                    continue
                tensor = None
                if storage(info.filename):
                    tensor = by_bytes.get(payload)
                    if tensor is None or tensor in found:
                        raise TemplateError(f"storage {info.filename} is none of the state's tensors")
                    found.add(tensor)
                header, offset, local_crc = _append_local(body, info.filename, payload)
                central_crc = _append_central(central, info.filename, payload, header)
                entries += 1
                if tensor is not None:
                    slots.append(_Slot(tensor, offset, len(payload), local_crc, central_crc))
        if found != set(probe):
            raise TemplateError(f"tensors missing from the archive: {sorted(set(probe) - found)}")
        if extra_name is None:
            raise TemplateError(f"the archive has no extra file {extra_file}")
        return cls(tensor_layout(probe), bytes(body), bytes(central), entries, slots, extra_name,
                   WeightsDigest(probe))

    @property
    def nbytes(self) -> int:
        """Memory the template holds (about one composed file)."""
        return len(self._body) + len(self._central) + self._digest.nbytes

    def views(self, state: dict[str, torch.Tensor]) -> dict[str, memoryview]:
        if tensor_layout(state) != self.layout:
            raise ValueError("archive template: the state's layout differs from the template's")
        return {name: tensor_bytes(t) for name, t in state.items()}

    def weights_sha256(self, views: dict[str, memoryview]) -> str:
        """sha256 of the canonical safetensors bytes (`poe.engine.pool.tensors_to_bytes`) of the state."""
        return self._digest.hexdigest(views)

    def render(self, views: dict[str, memoryview], meta: dict) -> bytes:
        """The archive for a state of the template's layout (`views`), with `meta` as the extra file."""
        body, central = bytearray(self._body), bytearray(self._central)
        for s in self._slots:
            data = views[s.name]
            body[s.offset:s.offset + s.size] = data
            crc = zlib.crc32(data)
            struct.pack_into("<I", body, s.local_crc, crc)
            struct.pack_into("<I", central, s.central_crc, crc)
        extra = json.dumps(meta, sort_keys=True).encode()
        header, _, _ = _append_local(body, self._extra_name, extra)
        _append_central(central, self._extra_name, extra, header)
        end = _END.pack(0x06054B50, 0, 0, self._entries + 1, self._entries + 1, len(central), len(body), 0)
        return b"".join((body, central, end))


def _append_local(body: bytearray, name: str | bytes, payload: bytes) -> tuple[int, int, int]:
    """Append a stored record; returns where its header and its data start and where its CRC is."""
    encoded = name.encode() if isinstance(name, str) else name
    start = len(body)
    fixed = start + _LOCAL.size + len(encoded)
    pad = (-(fixed + 4)) % _ALIGN  # the extra field holds a 4-byte header and the padding
    crc = zlib.crc32(payload)
    body += _LOCAL.pack(0x04034B50, _VERSION, 0, 0, *_DOS_DATE, crc, len(payload), len(payload),
                        len(encoded), 4 + pad)
    body += encoded + struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # 'FB': torch's padding field id
    data_offset = len(body)
    body += payload
    return start, data_offset, start + 14  # the CRC follows signature, versions, flags, method, time, date


def _append_central(central: bytearray, name: str | bytes, payload: bytes, header_offset: int) -> int:
    """Append a central directory entry; returns where its CRC field is."""
    encoded = name.encode() if isinstance(name, str) else name
    start = len(central)
    central += _CENTRAL.pack(0x02014B50, _VERSION, _VERSION, 0, 0, *_DOS_DATE, zlib.crc32(payload), len(payload),
                             len(payload), len(encoded), 0, 0, 0, 0, 0, header_offset)
    central += encoded
    return start + 16  # after signature, two versions, flags, method, time, date


def _safetensors_layout(probe: dict[str, torch.Tensor]) -> tuple[bytes, list[str]]:
    """The safetensors header of the layout and the order of the tensors' data after it, checked
    against `tensors_to_bytes` on the probe."""
    canonical = tensors_to_bytes(probe)
    (n,) = struct.unpack("<Q", canonical[:8])
    header = canonical[:8 + n]
    spec = json.loads(header[8:])
    order = sorted((name for name in spec if name != "__metadata__"), key=lambda k: spec[k]["data_offsets"][0])
    rebuilt = b"".join([header] + [bytes(tensor_bytes(probe[name])) for name in order])
    if rebuilt != canonical:
        raise TemplateError("the safetensors layout is not a plain concatenation of the tensors")
    return header, order
