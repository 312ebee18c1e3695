"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009): 50k/10k 32x32 colour images, 10 or 100 classes.

Read from the "python version" of the datasets, the layout torchvision downloads:
data_dir/cifar-10-batches-py/{data_batch_1..5, test_batch} and data_dir/cifar-100-python/
{train, test}. Each file is a pickled dict: "data" an N x 3072 uint8 array, one row per image
holding the red, then green, then blue 32x32 plane (row-major), and "labels" (CIFAR-10) or
"fine_labels" (CIFAR-100). The files are parsed here rather than by torchvision's CIFAR classes,
which insist on the original md5 sums; torchvision is only used to download them
(`download: true`, when the files are missing).

Note: unpickling runs whatever the file says; only point data_dir at files you trust.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import numpy as np
import torch

from ..config import ConfigError
from ..config.options import CIFARConfig
from . import TensorData, register
from .mnist import try_download, tv_dataset


@dataclass(frozen=True)
class Spec:
    name: str
    title: str
    folder: str
    train_files: Tuple[str, ...]
    test_files: Tuple[str, ...]
    label_key: str
    num_classes: int
    tv_name: str  # torchvision's dataset class, to download with
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]


# Normalisation statistics of the 50,000 training images, pixels x scaled to [0, 1], per
# channel c over all M = 50,000 * 32 * 32 values of that channel:
#     mean_c = sum(x) / M,    std_c = sqrt(sum((x - mean_c)^2) / M)    (population std, ddof=0)
# which is what `channel_stats` below computes. For CIFAR-10 this gives std 0.2470, 0.2435,
# 0.2616 (CIFAR-100: 0.2673, 0.2564, 0.2762). The (0.2023, 0.1994, 0.2010) found in many
# training scripts is some other statistic, not this population std.
CIFAR10 = Spec("cifar10", "CIFAR-10", "cifar-10-batches-py",
               tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "labels", 10,
               "CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100 = Spec("cifar100", "CIFAR-100", "cifar-100-python", ("train",), ("test",), "fine_labels", 100,
                "CIFAR100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def channel_stats(images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std of uint8 N x C x H x W images scaled to [0, 1]
    (how the constants above are defined), accumulated in float64."""
    x = images.astype(np.float64) / 255.0
    mean = x.mean(axis=(0, 2, 3))
    std = np.sqrt(((x - mean[None, :, None, None]) ** 2).mean(axis=(0, 2, 3)))
    return mean, std


def read_batch(path: Path, label_key: str) -> Tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> uint8 images N x 3 x 32 x 32 and int64 labels N."""
    try:
        with open(path, "rb") as f:
            # latin1: the original files were written by Python 2; their str keys and numpy
            # array buffers load unchanged this way
            batch = pickle.load(f, encoding="latin1")
    except Exception as e:
        raise ConfigError(f"{path} is not a CIFAR batch: {type(e).__name__}: {e}") from None
    if not isinstance(batch, dict):
        raise ConfigError(f"{path} is not a CIFAR batch: holds a {type(batch).__name__}, not a dict")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise ConfigError(f"{path} is not a CIFAR batch: keys {sorted(batch)}, expected 'data' and {label_key!r}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise ConfigError(f"{path}: data {list(data.shape)} and {label_key} {list(labels.shape)} "
                          f"are not N x 3072 and N")
    return data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32), labels


def load_cifar(spec: Spec, cfg: CIFARConfig, data_dir: str) -> TensorData:
    root = Path(data_dir).expanduser()
    folder = root / spec.folder
    names = spec.train_files + spec.test_files
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        reason = "download=false"
        if cfg.download:
            reason = try_download(lambda: tv_dataset(spec.tv_name)(root=str(root), train=True, download=True), folder)
            missing = [n for n in names if not (folder / n).is_file()]
            reason = reason or (f"download failed: no files in {folder} afterwards" if missing else None)
        if missing:
            raise ConfigError(f"{spec.title} not found: no {', '.join(missing)} in {folder}; {reason}")

    def read(files):
        parts = [read_batch(folder / n, spec.label_key) for n in files]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        bad = (y < 0) | (y >= spec.num_classes)
        if bad.any():
            raise ConfigError(f"{spec.title}: labels outside 0..{spec.num_classes - 1} in {folder}")
        return x, torch.from_numpy(y)

    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)

    def images(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x).to(torch.float32).div_(255.0)
        return t.sub_(mean).div_(std) if cfg.normalize else t

    x_train, y_train = read(spec.train_files)
    x_test, y_test = read(spec.test_files)
    zero = (-mean / std).flatten() if cfg.normalize else torch.zeros(3)
    return TensorData(spec.name, images(x_train), y_train, images(x_test), y_test,
                      num_classes=spec.num_classes, pixel_zero=zero)


@register("cifar10")
def load_cifar10(cfg: CIFARConfig, data_dir: str) -> TensorData:
    return load_cifar(CIFAR10, cfg, data_dir)


@register("cifar100")
def load_cifar100(cfg: CIFARConfig, data_dir: str) -> TensorData:
    return load_cifar(CIFAR100, cfg, data_dir)
