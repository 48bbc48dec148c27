import gzip
import struct

import numpy as np
import pytest
import torch

from poe.engine.data import FASHION_MNIST_CLASSES, Dataset, augment, load_dataset, load_image_folder, load_npz, read_idx
from poe.engine.errors import DataError


def idx_bytes(array: np.ndarray, dtype_code: int = 0x08) -> bytes:
    header = bytes([0, 0, dtype_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def images():
    return np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_roundtrip(tmp_path, images, compress):
    raw = idx_bytes(images)
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    np.testing.assert_array_equal(read_idx(path), images)


def test_read_idx_rejects_bad_magic(tmp_path, images):
    raw = bytearray(idx_bytes(images))
    raw[0] = 7
    (tmp_path / "f").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "f")


def test_read_idx_rejects_unknown_type(tmp_path, images):
    (tmp_path / "f").write_bytes(idx_bytes(images, dtype_code=0x42))
    with pytest.raises(DataError, match="element type"):
        read_idx(tmp_path / "f")


def test_read_idx_rejects_truncated_body(tmp_path, images):
    (tmp_path / "f").write_bytes(idx_bytes(images)[:-7])
    with pytest.raises(DataError, match=r"header says \(3, 4, 5\)"):
        read_idx(tmp_path / "f")


def test_read_idx_rejects_trailing_bytes(tmp_path, images):
    (tmp_path / "f").write_bytes(idx_bytes(images) + b"\0")
    with pytest.raises(DataError, match="holds 61 bytes"):
        read_idx(tmp_path / "f")


def test_read_idx_rejects_truncated_header(tmp_path, images):
    (tmp_path / "f").write_bytes(idx_bytes(images)[:9])
    with pytest.raises(DataError, match="truncated IDX header"):
        read_idx(tmp_path / "f")


def test_read_idx_rejects_corrupt_gzip(tmp_path, images):
    data = gzip.compress(idx_bytes(images))
    (tmp_path / "f.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="corrupt gzip"):
        read_idx(tmp_path / "f.gz")


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(DataError) as e:
        read_idx(tmp_path / "nope")
    assert "\n" not in str(e.value) and "no such file" in str(e.value)


def test_idx_folder_with_mismatched_counts(tmp_path, images):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(2, np.uint8)))
    with pytest.raises(DataError, match="3 train images but labels"):
        load_dataset(str(tmp_path), "train")


def test_real_fashion_mnist(fmnist_train, fmnist_test):
    assert fmnist_train.images.shape == (60000, 1, 28, 28)
    assert fmnist_test.images.shape == (10000, 1, 28, 28)
    assert fmnist_train.classes == FASHION_MNIST_CLASSES
    assert fmnist_test.classes[9] == "Ankle boot" and fmnist_test.classes[0] == "T-shirt/top"
    # Balanced: 1000 test images per class.
    assert torch.bincount(fmnist_test.labels).tolist() == [1000] * 10


def test_fashion_mnist_missing_dir_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("POE_DATA_DIR", str(tmp_path / "absent"))
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "test")


def test_npz_dataset(tmp_path):
    imgs = np.random.default_rng(0).random((6, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", images=imgs, labels=np.array([0, 1, 2, 0, 1, 2]), classes=np.array(["a", "b", "c"]))
    ds = load_npz(tmp_path / "d.npz")
    assert ds.images.shape == (6, 1, 8, 8) and ds.images.dtype == torch.uint8
    assert ds.classes == ("a", "b", "c")


def test_npz_rejects_out_of_range_floats(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.full((2, 4, 4), 3.0), labels=np.array([0, 1]))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        load_npz(tmp_path / "d.npz")


def test_image_folder_dataset(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((10, 10), 40 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = load_image_folder(tmp_path)
    assert ds.classes == ("cat", "dog") and ds.images.shape == (6, 1, 10, 10)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_image_folder_rejects_mixed_sizes(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "a" / "1.png")
    Image.fromarray(np.zeros((12, 10), np.uint8)).save(tmp_path / "a" / "2.png")
    with pytest.raises(DataError, match="all images must share one size"):
        load_image_folder(tmp_path)


def test_dataset_rejects_labels_out_of_range():
    with pytest.raises(DataError, match="labels outside"):
        Dataset("x", torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 5]), ("a", "b"))


def test_augment_keeps_shape_and_content():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 28, 28)
    y = augment(x, g)
    assert y.shape == x.shape
    # Translations by <= 2 pixels lose at most a 2-pixel border: the centre mass is preserved.
    assert torch.allclose(y.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)), rtol=0.3)


def test_stratified_subset_is_balanced(fmnist_test):
    sub = fmnist_test.stratified(7, seed=1)
    assert torch.bincount(sub.labels).tolist() == [7] * 10


def test_builtin_data_sets_name_their_hierarchy(tmp_path):
    from poe.engine.data import builtin_dataset, default_hierarchy, has_test_split
    from poe.engine.hierarchy import builtin

    for spelling in ("fashion-mnist", "fashion_mnist"):
        ds = builtin_dataset(spelling)
        assert ds is not None and ds.name == "fashion-mnist" and default_hierarchy(spelling) == ds.hierarchy
        assert builtin(ds.hierarchy).dataset == ds.name and has_test_split(spelling)
    assert builtin_dataset(str(tmp_path)) is None and builtin_dataset("Fashion-MNIST") is None
    # Any other data set: the hierarchy named like its file or folder (which may not exist).
    assert default_hierarchy("/data/mnist.npz") == "mnist" and not has_test_split("/data/mnist.npz")
    (tmp_path / "test").mkdir()
    assert has_test_split(str(tmp_path))
