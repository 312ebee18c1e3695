"""MNIST (LeCun et al. 1998) and Fashion-MNIST (Xiao et al. 2017): 60k/10k 28x28 grey images.

Where the files are looked for, in order:
1. torchvision's layout, read by torchvision: data_dir/MNIST/raw/ or data_dir/FashionMNIST/raw/
   holding the four uncompressed IDX files (train-images-idx3-ubyte, ...);
2. the same four files, gzipped or not, read by `read_idx`: in <data_dir>/<Class>/raw and
   data_dir/mnist (MNIST) or data_dir, data_dir/fashion-mnist, data_dir/fashion_mnist and
   `system_dir`, /usr/share/datasets/fashion-mnist by default, where Debian's
   `dataset-fashion-mnist` package puts them (Fashion-MNIST). data_dir itself is only searched
   for Fashion-MNIST: the two datasets use the same file names;
3. with `download: true`, torchvision downloads them into data_dir/<Class>/raw.

This module also holds the download helper the CIFAR loader uses.
"""

from __future__ import annotations

import gzip
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from ..config import ConfigError
from ..config.options import DEBIAN_DIR, FashionMNISTConfig, MNISTConfig
from . import TensorData, register

FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# a stalled connection gives up after this many seconds without data (urllib has no timeout
# of its own, so a download through a black-holed network could otherwise wait forever)
DOWNLOAD_TIMEOUT = 30.0


@dataclass(frozen=True)
class Family:
    name: str  # registry name
    title: str  # for messages
    tv_name: str  # the torchvision dataset class: its name is the folder under data_dir
    aliases: tuple  # further subfolders of data_dir looked in
    search_root: bool  # whether data_dir itself is looked in
    # mean and std of all training pixels scaled to [0, 1]
    mean: float
    std: float


MNIST = Family("mnist", "MNIST", "MNIST", ("mnist",), False, 0.1307, 0.3081)
FASHION_MNIST = Family("fashion_mnist", "Fashion-MNIST", "FashionMNIST",
                       ("fashion-mnist", "fashion_mnist"), True, 0.2860, 0.3530)


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


def candidate_dirs(data_dir: str, system_dir: Optional[str] = DEBIAN_DIR,
                   family: Family = FASHION_MNIST) -> List[Path]:
    """The folders `find_file` looks in, in order (defaults: Fashion-MNIST's)."""
    root = Path(data_dir).expanduser()
    dirs = ([root] if family.search_root else []) + [root / family.tv_name / "raw"]
    dirs += [root / a for a in family.aliases]
    return dirs + ([Path(system_dir)] if system_dir else [])


def find_file(stem: str, dirs: List[Path]) -> Optional[Path]:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def short_reason(error: BaseException) -> str:
    """One short line for an exception: the last line of its message (torchvision's download
    errors list every mirror tried; the last line is the last mirror's error)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[-1] if lines else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def try_download(fetch: Callable[[], object], folder: Path) -> Optional[str]:
    """Run `fetch` (a torchvision download into `folder` or below); None on success, else
    "download failed: <reason>". Folders it created and left empty are removed again, so a
    failed attempt leaves no trace."""
    created = []
    d = folder.resolve()
    while not d.exists():
        created.append(d)
        d = d.parent
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        fetch()
        return None
    except Exception as e:  # network, HTTP, checksum or disk errors: all end the same way
        for d in created:  # deepest first
            if not d.exists():
                continue  # the download had not got this far
            try:
                os.rmdir(d)
            except OSError:
                break  # not empty (a partial download): keep it and its parents
        return f"download failed: {short_reason(e)}"
    finally:
        socket.setdefaulttimeout(old)


def tv_dataset(name: str):
    """torchvision's dataset class (imported here: torchvision takes a second to load)."""
    import torchvision.datasets

    return getattr(torchvision.datasets, name)


def _read_torchvision(family: Family, root: Path) -> Dict[str, torch.Tensor]:
    raw = root / family.tv_name / "raw"
    try:
        train = tv_dataset(family.tv_name)(root=str(root), train=True, download=False)
        test = tv_dataset(family.tv_name)(root=str(root), train=False, download=False)
    except Exception as e:  # a damaged file: torchvision's asserts and parse errors
        raise ConfigError(f"{family.title}: cannot read the IDX files in {raw}: {short_reason(e)}") from None
    return {"x_train": train.data, "y_train": train.targets, "x_test": test.data, "y_test": test.targets}


def _tv_layout_complete(family: Family, root: Path) -> bool:
    raw = root / family.tv_name / "raw"
    return all((raw / stem).is_file() for stem in FILES.values())


def find_arrays(family: Family, data_dir: str, download: bool,
                system_dir: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The four arrays (uint8 images N x 28 x 28, integer labels N), wherever they are."""
    root = Path(data_dir).expanduser()
    if _tv_layout_complete(family, root):
        return _read_torchvision(family, root)
    dirs = candidate_dirs(data_dir, system_dir, family)
    found = {key: find_file(stem, dirs) for key, stem in FILES.items()}
    if all(p is not None for p in found.values()):
        return {k: torch.from_numpy(read_idx(p).copy()) for k, p in found.items()}
    reason = "download=false"
    if download:
        raw = root / family.tv_name / "raw"
        reason = try_download(lambda: tv_dataset(family.tv_name)(root=str(root), train=True, download=True), raw)
        if reason is None and _tv_layout_complete(family, root):
            return _read_torchvision(family, root)
        reason = reason or f"download failed: no files in {raw} afterwards"
    missing = [FILES[k] + "[.gz]" for k, p in found.items() if p is None]
    raise ConfigError(f"{family.title} not found: no {', '.join(missing)} in "
                      f"{', '.join(str(d) for d in dirs)}; {reason}")


def load_family(family: Family, cfg: MNISTConfig, data_dir: str, system_dir: Optional[str] = None) -> TensorData:
    arrays = find_arrays(family, data_dir, cfg.download, system_dir)
    for split in ("train", "test"):
        x, y = arrays["x_" + split], arrays["y_" + split]
        if x.dim() != 3 or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise ConfigError(f"{family.title}: {split} images {list(x.shape)} and labels {list(y.shape)} "
                              f"do not match (expected N x 28 x 28 and N)")
        if y.numel() and not (0 <= int(y.min()) and int(y.max()) < 10):
            raise ConfigError(f"{family.title}: {split} labels outside 0..9")

    def images(a: torch.Tensor) -> torch.Tensor:
        x = a.to(torch.float32).div_(255.0).unsqueeze(1)  # N, 1, 28, 28
        return x.sub_(family.mean).div_(family.std) if cfg.normalize else x

    zero = torch.tensor([-family.mean / family.std if cfg.normalize else 0.0])
    return TensorData(family.name, images(arrays["x_train"]), arrays["y_train"].to(torch.int64),
                      images(arrays["x_test"]), arrays["y_test"].to(torch.int64), num_classes=10,
                      pixel_zero=zero)


@register("mnist")
def load_mnist(cfg: MNISTConfig, data_dir: str) -> TensorData:
    return load_family(MNIST, cfg, data_dir)


@register("fashion_mnist")
def load_fashion_mnist(cfg: FashionMNISTConfig, data_dir: str) -> TensorData:
    return load_family(FASHION_MNIST, cfg, data_dir, cfg.system_dir)
