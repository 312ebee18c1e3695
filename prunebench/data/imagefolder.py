"""Image folders in the ImageNet layout: data_dir/<train_dir>/<class>/<image> and
data_dir/<test_dir>/<class>/<image>, read by torchvision's ImageFolder.

Too large to hold in memory, so `LoaderData` streams batches through DataLoaders with worker
processes: decoding and transforms run on the CPU, per image. Training images get
RandomResizedCrop(image_size) and a horizontal flip when `augment` is on (else the test
transform); test and validation images Resize(resize) + CenterCrop(image_size). All are
normalised with the ImageNet statistics. `crop_padding` does not apply here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ..config import ConfigError
from ..distributed import shard
from ..options import ImageFolderConfig
from . import Batch, register

# ImageNet's per-channel mean and std of pixels in [0, 1] (the values torchvision's models use)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Transformed(Dataset):
    """`base` (yielding PIL images) with `transform` applied to each image."""

    def __init__(self, base: Dataset, transform: Callable):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return self.transform(image), label


class LoaderData:
    """Train/val/test datasets behind DataLoaders, with TensorData's interface."""

    def __init__(self, name: str, num_classes: int, input_shape: Tuple[int, ...], train: Dataset,
                 test: Dataset, val: Optional[Dataset] = None, workers: int = 0):
        self.name = name
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.splits = {"train": train, "val": val, "test": test}
        self.workers = workers
        self.device: Optional[torch.device] = None

    def num_examples(self, split: str) -> int:
        ds = self.splits[split]
        return 0 if ds is None else len(ds)

    def to(self, device) -> "LoaderData":
        """Batches will be moved to `device` as they are served (the data stays on disk)."""
        self.device = torch.device(device)
        return self

    def _loader(self, split: str, batch_size: int, generator: Optional[torch.Generator]) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=batch_size, shuffle=generator is not None,
                          generator=generator, num_workers=self.workers,
                          pin_memory=self.device is not None and self.device.type == "cuda")

    def _served(self, loader: DataLoader) -> Iterator[Batch]:
        for x, y in loader:
            if self.device is not None:
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
            yield x, y

    def train_batches(self, batch_size: int, generator: torch.Generator, rank_shard: bool = False) -> Iterator[Batch]:
        """One epoch in an order drawn from `generator`. Random transforms in worker processes
        are seeded from it too (DataLoader seeds each worker from its generator); with
        workers=0 they draw from torch's global generator. With `rank_shard`, each global batch of
        the same order is cut to this rank's part before loading: a rank reads only its images."""
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        order = torch.Generator().manual_seed(seed)
        if not rank_shard:
            return self._served(self._loader("train", batch_size, order))
        sampler = RankBatches(len(self.splits["train"]), batch_size, order)
        return self._served(DataLoader(self.splits["train"], batch_sampler=sampler, num_workers=self.workers,
                                       generator=order, pin_memory=self.device is not None and
                                       self.device.type == "cuda"))

    def sample_inputs(self, split: str, n: int, batch_size: int,
                      generator: torch.Generator) -> Iterator[torch.Tensor]:
        """n inputs of a split drawn at random without replacement (through the split's transforms)."""
        ds = self.splits[split]
        idx = torch.randperm(len(ds), generator=generator)[:n].tolist()
        for x, _ in self._served(self._loader_of(Subset(ds, idx), batch_size)):
            yield x

    def _loader_of(self, ds: Dataset, batch_size: int) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size, num_workers=self.workers,
                          pin_memory=self.device is not None and self.device.type == "cuda")

    def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        if self.splits[split] is None:
            return iter(())
        return self._served(self._loader(split, batch_size, None))


class RankBatches(Sampler):
    """The global batches of one epoch (a permutation drawn from `order`, cut every batch_size),
    each cut to this rank's contiguous part, as distributed.shard cuts a batch in memory."""

    def __init__(self, n: int, batch_size: int, order: torch.Generator):
        self.n, self.batch_size, self.order = n, batch_size, order

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        perm = torch.randperm(self.n, generator=self.order)
        for start in range(0, self.n, self.batch_size):
            yield shard(perm[start:start + self.batch_size]).tolist()


def _image_folder(path: Path, what: str):
    if not path.is_dir():
        raise ConfigError(f"imagefolder: {what} folder {path} not found (set data_dir and dataset.{what}_dir)")
    try:
        from torchvision import datasets  # a second to load: only when used

        return datasets.ImageFolder(str(path))
    except (FileNotFoundError, ValueError) as e:  # no class folders, or no images in them
        raise ConfigError(f"imagefolder: no images in {path}: {' '.join(str(e).split())}") from None


@register("imagefolder")
def load_imagefolder(cfg: ImageFolderConfig, data_dir: str) -> LoaderData:
    root = Path(data_dir).expanduser()
    train_dir, test_dir = root / cfg.train_dir, root / cfg.test_dir
    train_base = _image_folder(train_dir, "train")
    test_base = _image_folder(test_dir, "test")
    if test_base.class_to_idx != train_base.class_to_idx:
        only_train = sorted(set(train_base.classes) - set(test_base.classes))
        only_test = sorted(set(test_base.classes) - set(train_base.classes))
        raise ConfigError(f"imagefolder: {train_dir} and {test_dir} have different class folders "
                          f"(only in train: {only_train[:5]}, only in test: {only_test[:5]})")

    from torchvision import transforms

    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    plain = transforms.Compose([transforms.Resize(cfg.resize), transforms.CenterCrop(cfg.image_size)] + normalize)
    if cfg.augment:
        flip = [transforms.RandomHorizontalFlip()] if cfg.flip else []
        train_tf = transforms.Compose([transforms.RandomResizedCrop(cfg.image_size)] + flip + normalize)
    else:
        train_tf = plain

    n = len(train_base)
    train: Dataset = Transformed(train_base, train_tf)
    val = None
    if cfg.val_size:
        if cfg.val_size >= n:
            raise ConfigError(f"dataset.val_size={cfg.val_size} leaves no training data ({n} examples)")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed)).tolist()
        val = Subset(Transformed(train_base, plain), order[:cfg.val_size])  # served like the test set
        train = Subset(train, order[cfg.val_size:])
    return LoaderData("imagefolder", len(train_base.classes), (3, cfg.image_size, cfg.image_size), train,
                      Transformed(test_base, plain), val, cfg.workers)
