"""Data sets: IDX files (Fashion-MNIST, MNIST), image folders and .npz archives.

Every loader returns a `Dataset` with uint8 images `[N, C, H, W]`, int64 labels `[N]` and the
class names in label order. Pixels are scaled to [0, 1] only when batches are made, so a whole
data set stays small in memory (Fashion-MNIST train: 47 MB).
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from poe.engine.errors import DataError, InvalidArgument

# As published by Zalando Research (github.com/zalandoresearch/fashion-mnist), label order.
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MNIST_CLASSES = tuple(str(d) for d in range(10))
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclass(frozen=True)
class Dataset:
    name: str
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.dtype != torch.uint8:
            raise DataError(f"{self.name}: images must be uint8 [N, C, H, W], "
                            f"got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.name}: {self.images.shape[0]} images but {self.labels.numel()} labels")
        if self.labels.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise DataError(f"{self.name}: labels outside 0..{len(self.classes) - 1}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: torch.Tensor) -> Dataset:
        return Dataset(self.name, self.images[indices], self.labels[indices], self.classes)

    def stratified(self, per_class: int, seed: int = 0) -> Dataset:
        """The first `per_class` images of every class after a seeded shuffle."""
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self), generator=g)
        picked = [order[self.labels[order] == c][:per_class] for c in range(len(self.classes))]
        return self.subset(torch.cat(picked).sort().values)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzip-compressed or plain), checking magic number, shape and length."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: corrupt gzip stream ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX element type 0x{dtype_code:02x}")
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    body = raw[4 + 4 * ndim:]
    if len(body) != expected:
        raise DataError(f"{path}: header says {shape} ({expected} bytes) but the file holds {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).exists():
            return directory / name
    raise DataError(f"{directory}: missing {stem}[.gz]")


def load_idx_pair(directory: Path, prefix: str, name: str, classes: tuple[str, ...]) -> Dataset:
    images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{directory}: {prefix} images must be a uint8 [N, H, W] IDX file, got shape {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{directory}: {images.shape[0]} {prefix} images but labels of shape {labels.shape}")
    return Dataset(name, torch.from_numpy(images.copy()).unsqueeze(1),
                   torch.from_numpy(labels.astype(np.int64)), classes)


def default_data_dir() -> Path:
    from poe.engine.config import settings

    return settings().data_dir


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None) -> Dataset:
    if split not in ("train", "test"):
        raise InvalidArgument(f"split must be 'train' or 'test', got {split!r}")
    directory = Path(data_dir) if data_dir else default_data_dir()
    if not directory.is_dir():
        raise DataError(f"{directory}: Fashion-MNIST not found "
                        "(apt-get install dataset-fashion-mnist, or set POE_DATA_DIR)")
    return load_idx_pair(directory, "train" if split == "train" else "t10k", "fashion-mnist", FASHION_MNIST_CLASSES)


def load_npz(path: str | os.PathLike, name: str | None = None) -> Dataset:
    """An .npz with `images` ([N, H, W] or [N, C, H, W], uint8 or float in [0, 1]), `labels`
    and optionally `classes` (names in label order)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z or "labels" not in z:
                raise DataError(f"{path}: an .npz data set needs arrays 'images' and 'labels'")
            images, labels = z["images"], z["labels"]
            classes = tuple(str(c) for c in z["classes"]) if "classes" in z else None
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable .npz ({e})") from None
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise DataError(f"{path}: images must be [N, H, W] or [N, C, H, W], got {images.shape}")
    if images.dtype != np.uint8:
        if images.min() < 0 or images.max() > 1:
            raise DataError(f"{path}: float images must lie in [0, 1]")
        images = np.round(images * 255).astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels must be integers")
    if classes is None:
        classes = tuple(str(c) for c in range(int(labels.max()) + 1 if labels.size else 0))
    return Dataset(name or path.stem, torch.from_numpy(np.ascontiguousarray(images)),
                   torch.from_numpy(labels.astype(np.int64)), classes)


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_image_folder(root: str | os.PathLike, name: str | None = None, grayscale: bool = True) -> Dataset:
    """A folder with one sub-folder of images per class; classes in sorted folder-name order."""
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class sub-folders")
    images, labels, size = [], [], None
    for label, d in enumerate(class_dirs):
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{d}: no images")
        for f in files:
            try:
                with Image.open(f) as im:
                    arr = np.asarray(im.convert("L" if grayscale else "RGB"))
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f"{f}: not a readable image ({e})") from None
            if size is None:
                size = arr.shape
            elif arr.shape != size:
                raise DataError(f"{f}: size {arr.shape[:2]} differs from {size[:2]}; all images must share one size")
            images.append(arr[None] if grayscale else arr.transpose(2, 0, 1))
            labels.append(label)
    return Dataset(name or root.name, torch.from_numpy(np.stack(images)),
                   torch.tensor(labels, dtype=torch.int64), tuple(d.name for d in class_dirs))


@dataclass(frozen=True)
class BuiltinDataset:
    """A data set known by name: how to load a split, and the built-in hierarchy of its classes
    (`poe/engine/hierarchies/<hierarchy>.yaml`)."""

    name: str
    hierarchy: str
    load: Callable[[str], Dataset]  # split ("train" | "test") -> Dataset


BUILTIN_DATASETS = {"fashion-mnist": BuiltinDataset("fashion-mnist", "fashion-mnist", load_fashion_mnist)}
_SPELLINGS = {"fashion_mnist": "fashion-mnist"}  # other accepted spellings of built-in names


def builtin_dataset(spec: str) -> BuiltinDataset | None:
    """The built-in data set `spec` names, or None when `spec` is a path."""
    return BUILTIN_DATASETS.get(_SPELLINGS.get(spec, spec))


def default_hierarchy(spec: str) -> str:
    """The name of the built-in hierarchy that goes with the data set `spec`: a built-in data set's
    own, else the file or folder name (`data/mnist.npz` -> `mnist`), which may name no hierarchy."""
    builtin = builtin_dataset(spec)
    return builtin.hierarchy if builtin is not None else Path(spec).stem


def has_test_split(spec: str) -> bool:
    """Whether `load_dataset(spec, "test")` gives images other than the training images."""
    if builtin_dataset(spec) is not None:
        return True
    path = Path(spec)
    return path.is_dir() and (any(path.glob("t10k-images-idx3-ubyte*")) or (path / "test").is_dir())


def dataset_choices() -> str:
    """What a data set argument may be, for error messages."""
    return f"{', '.join(BUILTIN_DATASETS)}, an IDX folder, an image folder or an .npz"


def load_dataset(spec: str, split: str = "train") -> Dataset:
    """A built-in data set by name, a directory of IDX files, an image-folder directory or an .npz file."""
    builtin = builtin_dataset(spec)
    if builtin is not None:
        return builtin.load(split)
    path = Path(spec)
    if path.suffix == ".npz":
        return load_npz(path)
    if path.is_dir():
        prefix = "train" if split == "train" else "t10k"
        if any(path.glob(f"{prefix}-images-idx3-ubyte*")):
            classes = tuple(str(i) for i in range(10))
            return load_idx_pair(path, prefix, path.name, classes)
        sub = path / split
        return load_image_folder(sub if sub.is_dir() else path)
    raise DataError(f"{spec}: unknown data set (use {dataset_choices()})")


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 2, flip: bool = True) -> torch.Tensor:
    """Random translation by up to `pad` pixels (zero fill) and horizontal flips, per sample."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        out[mask] = out[mask].flip(-1)
    return out
