import gzip
import struct

import numpy as np
import pytest
import torch

from prunebench.config import ConfigError
from prunebench.data import build_dataset
from prunebench.data.fashion_mnist import FashionMNISTConfig, read_idx
from prunebench.data.synthetic import SyntheticConfig


def write_idx(path, array, compress):
    codes = {np.uint8: 0x08}
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype.type], array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path, compress):
    a = np.random.default_rng(0).integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    write_idx(path, a, compress)
    assert np.array_equal(read_idx(path), a)


def test_truncated_idx_is_refused(tmp_path):
    a = np.zeros((5, 4), dtype=np.uint8)
    write_idx(tmp_path / "x", a, compress=False)
    raw = (tmp_path / "x").read_bytes()
    (tmp_path / "x").write_bytes(raw[:-3])
    with pytest.raises(ConfigError, match="truncated"):
        read_idx(tmp_path / "x")


def make_fashion_mnist(root, n_train=12, n_test=5):
    rng = np.random.default_rng(1)
    raw = root / "FashionMNIST" / "raw"  # torchvision's layout
    raw.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (n_train,), dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (n_test,), dtype=np.uint8),
    }
    for name, a in arrays.items():
        write_idx(raw / (name + ".gz"), a, compress=True)
    return arrays


def test_fashion_mnist_loader_reads_generated_files(tmp_path):
    arrays = make_fashion_mnist(tmp_path)
    data = build_dataset(FashionMNISTConfig(name="fashion_mnist", system_dir=None), str(tmp_path))
    assert data.x_train.shape == (12, 1, 28, 28) and data.x_test.shape == (5, 1, 28, 28)
    assert torch.equal(data.y_train, torch.from_numpy(arrays["train-labels-idx1-ubyte"].astype(np.int64)))
    pixels = torch.from_numpy(arrays["t10k-images-idx3-ubyte"].astype(np.float32) / 255)
    torch.testing.assert_close(data.x_test[:, 0] * 0.3530 + 0.2860, pixels)


def test_missing_fashion_mnist_names_where_it_looked(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path)):
        build_dataset(FashionMNISTConfig(name="fashion_mnist", system_dir=None), str(tmp_path))


def test_synthetic_data_is_fixed_by_its_own_seed_and_balanced():
    a = build_dataset(SyntheticConfig(name="synthetic"), "")
    b = build_dataset(SyntheticConfig(name="synthetic"), "")
    assert torch.equal(a.x_train, b.x_train)
    assert torch.bincount(a.y_train).tolist() == [1024 // 10 + (1 if i < 1024 % 10 else 0) for i in range(10)]


def test_batches_cover_the_training_set_once_per_epoch():
    data = build_dataset(SyntheticConfig(name="synthetic", num_train=103), "")
    seen = torch.cat([y for _, y in data.train_batches(10, torch.Generator().manual_seed(0))])
    assert seen.numel() == 103
    assert torch.equal(torch.sort(seen).values, torch.sort(data.y_train).values)
