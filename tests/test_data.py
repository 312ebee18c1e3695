import gzip
import pickle
import re
import socket
import struct

import numpy as np
import pytest
import torch
from conftest import make_config
from PIL import Image

from prunebench.config import ConfigError
from prunebench.data import TensorData, build_dataset
from prunebench.data import mnist as mnist_module
from prunebench.data.cifar import CIFAR10, CIFAR100, channel_stats
from prunebench.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD, LoaderData
from prunebench.data.mnist import read_idx
from prunebench.config.options import CIFARConfig, FashionMNISTConfig, ImageFolderConfig, MNISTConfig, SyntheticConfig


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test here runs offline: name lookups and connections fail at once."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


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


# ------------------------------------------------------------------------ MNIST / Fashion-MNIST
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


def make_idx_files(folder, compress, n_train=6, n_test=3, seed=2):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = dict(zip(IDX_NAMES, (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
                                  rng.integers(0, 10, (n_train,), dtype=np.uint8),
                                  rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
                                  rng.integers(0, 10, (n_test,), dtype=np.uint8))))
    for name, a in arrays.items():
        write_idx(folder / (name + (".gz" if compress else "")), a, compress)
    return arrays


def check_idx_data(data, arrays, mean, std):
    x_train, y_train, x_test, y_test = (arrays[n] for n in IDX_NAMES)
    assert data.x_train.dtype == torch.float32 and data.x_train.shape == (6, 1, 28, 28)
    assert data.x_test.shape == (3, 1, 28, 28) and data.num_classes == 10
    assert torch.equal(data.y_train, torch.from_numpy(y_train.astype(np.int64)))
    assert torch.equal(data.y_test, torch.from_numpy(y_test.astype(np.int64)))
    torch.testing.assert_close(data.x_train[:, 0] * std + mean, torch.from_numpy(x_train / 255).float())
    torch.testing.assert_close(data.x_test[:, 0] * std + mean, torch.from_numpy(x_test / 255).float())
    torch.testing.assert_close(data.pixel_zero, torch.tensor([-mean / std]))


@pytest.mark.parametrize("cfg,folder,mean,std", [
    (MNISTConfig(name="mnist", download=False), "MNIST", 0.1307, 0.3081),
    (FashionMNISTConfig(name="fashion_mnist", download=False, system_dir=None), "FashionMNIST", 0.2860, 0.3530),
])
def test_mnist_family_read_by_torchvision_from_its_layout(tmp_path, monkeypatch, cfg, folder, mean, std):
    arrays = make_idx_files(tmp_path / folder / "raw", compress=False)

    def not_this_reader(path):
        raise AssertionError("torchvision's layout should be read by torchvision")

    monkeypatch.setattr(mnist_module, "read_idx", not_this_reader)
    data = build_dataset(cfg, str(tmp_path))
    assert data.name == cfg.name
    check_idx_data(data, arrays, mean, std)


def test_mnist_without_normalisation_is_pixels_in_0_1(tmp_path):
    arrays = make_idx_files(tmp_path / "MNIST" / "raw", compress=False)
    data = build_dataset(MNISTConfig(name="mnist", download=False, normalize=False), str(tmp_path))
    check_idx_data(data, arrays, 0.0, 1.0)


def test_fashion_mnist_from_gzipped_system_dir(tmp_path):
    arrays = make_idx_files(tmp_path / "system", compress=True)
    cfg = FashionMNISTConfig(name="fashion_mnist", download=False, system_dir=str(tmp_path / "system"))
    data = build_dataset(cfg, str(tmp_path / "empty"))
    check_idx_data(data, arrays, 0.2860, 0.3530)


def test_mnist_does_not_take_fashion_files_from_data_dir_itself(tmp_path):
    make_idx_files(tmp_path, compress=True)  # Fashion-MNIST's legacy place: data_dir itself
    with pytest.raises(ConfigError, match="MNIST not found"):
        build_dataset(MNISTConfig(name="mnist", download=False), str(tmp_path))


# -------------------------------------------------------------------------------------- CIFAR
def make_cifar(root, spec, per_file=2, byte_keys=False):
    """Pickled batches in the python-version layout: `per_file` images each, distinct pixels."""
    rng = np.random.default_rng(3)
    folder = root / spec.folder
    folder.mkdir(parents=True)
    written = {}
    for name in spec.train_files + spec.test_files:
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, spec.num_classes, per_file)]
        batch = {"data": data, spec.label_key: labels, "batch_label": name}
        if byte_keys:
            batch = {k.encode(): v for k, v in batch.items()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        written[name] = (data, labels)
    return written


@pytest.mark.parametrize("spec,byte_keys", [(CIFAR10, False), (CIFAR100, True)])
def test_cifar_read_from_generated_pickles(tmp_path, spec, byte_keys):
    written = make_cifar(tmp_path, spec, byte_keys=byte_keys)
    data = build_dataset(CIFARConfig(name=spec.name, download=False, augment=True), str(tmp_path))
    assert isinstance(data, TensorData) and data.num_classes == spec.num_classes
    n_train = 2 * len(spec.train_files)
    assert data.x_train.shape == (n_train, 3, 32, 32) and data.x_test.shape == (2, 3, 32, 32)
    rows = np.concatenate([written[n][0] for n in spec.train_files])
    labels = sum((written[n][1] for n in spec.train_files), [])
    assert data.y_train.tolist() == labels and data.y_test.tolist() == written[spec.test_files[0]][1]
    mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
    pixels = data.x_train * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    # row layout: 1024 red values, then green, then blue; each plane row-major
    for i, c, h, w in [(0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (1, 1, 5, 7), (n_train - 1, 2, 31, 30)]:
        assert pixels[i, c, h, w].item() == pytest.approx(rows[i, c * 1024 + h * 32 + w] / 255, abs=1e-5)
    torch.testing.assert_close(pixels, torch.from_numpy(rows.reshape(-1, 3, 32, 32) / 255).float())
    torch.testing.assert_close(data.pixel_zero, -mean / std)
    assert data.augment is not None and data.augment.padding == 4


def test_cifar_batch_with_wrong_shape_is_refused(tmp_path):
    make_cifar(tmp_path, CIFAR100)
    with open(tmp_path / CIFAR100.folder / "test", "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "fine_labels": [0, 1]}, f)
    with pytest.raises(ConfigError, match="not N x 3072"):
        build_dataset(CIFARConfig(name="cifar100", download=False), str(tmp_path))


def test_channel_stats_are_the_population_mean_and_std():
    images = np.random.default_rng(4).integers(0, 256, (5, 3, 4, 4), dtype=np.uint8)
    mean, std = channel_stats(images)
    per_channel = images.transpose(1, 0, 2, 3).reshape(3, -1) / 255.0
    np.testing.assert_allclose(mean, per_channel.mean(axis=1))
    np.testing.assert_allclose(std, per_channel.std(axis=1, ddof=0))


# ------------------------------------------------------------------------------ missing data
MISSING = [
    (MNISTConfig(name="mnist", download=False), "MNIST/raw"),
    (FashionMNISTConfig(name="fashion_mnist", download=False, system_dir=None), "FashionMNIST/raw"),
    (CIFARConfig(name="cifar10", download=False), "cifar-10-batches-py"),
    (CIFARConfig(name="cifar100", download=False), "cifar-100-python"),
]


@pytest.mark.parametrize("cfg,folder", MISSING)
def test_missing_dataset_names_the_folder_in_one_line(tmp_path, cfg, folder):
    with pytest.raises(ConfigError) as info:
        build_dataset(cfg, str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and "not found" in message
    assert str(tmp_path / folder) in message and message.endswith("download=false")


@pytest.mark.parametrize("cfg,folder", MISSING)
def test_failed_download_is_reported_and_leaves_no_folders(tmp_path, cfg, folder):
    cfg = type(cfg)(**{**vars(cfg), "download": True})
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "new" / folder))) as info:
        build_dataset(cfg, str(tmp_path / "new"))
    assert "download failed: " in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "new").exists()  # the folders created for the download are gone again


# -------------------------------------------------------------------------------- imagefolder
COLOURS = {"cat": (255, 0, 0), "dog": (0, 0, 255)}  # one solid colour per class


def make_image_folders(root, train_per_class=4, test_per_class=2):
    for split, n in (("train", train_per_class), ("val", test_per_class)):
        for cls, colour in COLOURS.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 40), colour).save(root / split / cls / f"{i}.png")


def expected_pixels(label):
    colour = list(COLOURS.values())[label]
    return [(v / 255 - m) / s for v, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD)]


def check_batches(batches, size):
    xs, ys = zip(*batches)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (size, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (size,)
    for image, label in zip(x, y.tolist()):  # solid images stay solid through every transform
        torch.testing.assert_close(image.mean(dim=(1, 2)), torch.tensor(expected_pixels(label)),
                                   atol=1e-4, rtol=0)
    return y


def test_imagefolder_serves_transformed_batches(tmp_path):
    make_image_folders(tmp_path)
    cfg = ImageFolderConfig(name="imagefolder", image_size=32, resize=36, workers=0, augment=True)
    data = build_dataset(cfg, str(tmp_path)).to("cpu")
    assert isinstance(data, LoaderData) and data.name == "imagefolder"
    assert data.num_classes == 2 and data.input_shape == (3, 32, 32)
    assert (data.num_examples("train"), data.num_examples("val"), data.num_examples("test")) == (8, 0, 4)
    y = check_batches(data.train_batches(3, torch.Generator().manual_seed(0)), 8)
    assert sorted(y.tolist()) == [0] * 4 + [1] * 4
    y_test = check_batches(data.eval_batches("test", 3), 4)
    assert y_test.tolist() == [0, 0, 1, 1]  # class folders in sorted order, unshuffled
    assert list(data.eval_batches("val", 3)) == []
    # the order is drawn from the generator
    again = torch.cat([y for _, y in data.train_batches(3, torch.Generator().manual_seed(0))])
    assert torch.equal(again, y)


def test_imagefolder_validation_split(tmp_path):
    make_image_folders(tmp_path, train_per_class=5)
    cfg = ImageFolderConfig(name="imagefolder", image_size=32, resize=36, workers=0, val_size=3, split_seed=1)
    data = build_dataset(cfg, str(tmp_path))
    assert (data.num_examples("train"), data.num_examples("val"), data.num_examples("test")) == (7, 3, 4)
    y_val = check_batches(data.eval_batches("val", 2), 3)
    y_train = check_batches(data.train_batches(4, torch.Generator().manual_seed(0)), 7)
    assert sorted(y_val.tolist() + y_train.tolist()) == [0] * 5 + [1] * 5
    assert set(data.splits["val"].indices).isdisjoint(data.splits["train"].indices)
    same = build_dataset(cfg, str(tmp_path))
    assert data.splits["val"].indices == same.splits["val"].indices  # fixed by split_seed


def test_imagefolder_missing_folder_is_named(tmp_path):
    make_image_folders(tmp_path)
    cfg = ImageFolderConfig(name="imagefolder", test_dir="test", workers=0)
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "test"))):
        build_dataset(cfg, str(tmp_path))


# ------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name,config_class,augment", [
    ("mnist", MNISTConfig, False), ("fashion_mnist", FashionMNISTConfig, False),
    ("cifar10", CIFARConfig, True), ("cifar100", CIFARConfig, True),
    ("imagefolder", ImageFolderConfig, True),
])
def test_dataset_options_compose(name, config_class, augment):
    cfg = make_config(f"dataset={name}")
    assert type(cfg.dataset) is config_class and cfg.dataset.name == name
    assert cfg.dataset.augment is augment


def test_imagefolder_config_checks_sizes():
    with pytest.raises(ConfigError, match="dataset.resize must be >= dataset.image_size"):
        make_config("dataset=imagefolder", "dataset.image_size=256", "dataset.resize=224")
