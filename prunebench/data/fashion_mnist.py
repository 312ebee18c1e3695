"""Fashion-MNIST (Xiao et al. 2017) from the standard IDX files, gzipped or not.

Looked for in `data_dir` (also its FashionMNIST/raw and fashion-mnist subfolders, the layouts
torchvision and Debian use) and in /usr/share/datasets/fashion-mnist, where Debian's
`dataset-fashion-mnist` package puts them.
"""

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from ..config import ConfigError, DatasetConfig
from . import TensorData, register

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
# mean and std of the training pixels in [0, 1]
MEAN, STD = 0.2860, 0.3530
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class FashionMNISTConfig(DatasetConfig):
    normalize: bool = True  # (x - mean) / std with the training set's statistics
    # also looked in after data_dir (Debian's package puts the files here); null: only data_dir
    system_dir: Optional[str] = DEBIAN_DIR


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (LeCun's MNIST format): magic 0x0000TTDD, DD big-endian dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ConfigError(f"{path} is not an IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ConfigError(f"{path} is truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims)


def candidate_dirs(data_dir: str, system_dir: Optional[str] = DEBIAN_DIR) -> List[Path]:
    root = Path(data_dir).expanduser()
    dirs = [root, root / "FashionMNIST" / "raw", root / "fashion-mnist", root / "fashion_mnist"]
    return dirs + ([Path(system_dir)] if system_dir else [])


def find_file(stem: str, dirs: List[Path]) -> Optional[Path]:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def find_fashion_mnist(data_dir: str, system_dir: Optional[str] = DEBIAN_DIR) -> dict:
    dirs = candidate_dirs(data_dir, system_dir)
    found = {key: find_file(stem, dirs) for key, stem in FILES.items()}
    missing = [FILES[k] for k, p in found.items() if p is None]
    if missing:
        raise ConfigError(
            f"Fashion-MNIST not found: no {', '.join(m + '[.gz]' for m in missing)} in "
            f"{', '.join(str(d) for d in dirs)}; install Debian's dataset-fashion-mnist or set data_dir")
    return found


@register("fashion_mnist", FashionMNISTConfig)
def load_fashion_mnist(cfg: FashionMNISTConfig, data_dir: str) -> TensorData:
    paths = find_fashion_mnist(data_dir, cfg.system_dir)
    arrays = {k: read_idx(p) for k, p in paths.items()}

    def images(a):
        x = torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)  # N, 1, 28, 28
        return (x - MEAN) / STD if cfg.normalize else x

    def labels(a):
        return torch.from_numpy(a.astype(np.int64))

    return TensorData("fashion_mnist", images(arrays["x_train"]), labels(arrays["y_train"]),
                      images(arrays["x_test"]), labels(arrays["y_test"]), num_classes=10)
