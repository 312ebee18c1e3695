"""Image folders in the ImageNet layout: data_dir/<train_dir>/<class>/<image> and
data_dir/<test_dir>/<class>/<image>, read by torchvision's ImageFolder.

Too large to hold in memory, so `LoaderData` streams batches through DataLoaders with worker
processes: decoding and transforms run on the CPU, per image. Training images get
RandomResizedCrop(image_size) and a horizontal flip when `augment` is on (else the test
transform); test and validation images Resize(resize) + CenterCrop(image_size). All are
normalised with the ImageNet statistics. `crop_padding` does not apply here.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ..config import ConfigError
from ..core.distributed import World, shard, world
from ..config.options import ImageFolderConfig
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
                          generator=generator, num_workers=self.workers, pin_memory=self._pinned())

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
        the same order is cut to this rank's part before loading: a rank reads only its images,
        and its transforms draw from a stream of its own (see `_rank_streams`)."""
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        order = torch.Generator().manual_seed(seed)
        if not rank_shard:
            return self._served(self._loader("train", batch_size, order))
        sampler = RankBatches(len(self.splits["train"]), batch_size, order)
        return self._rank_streams(sampler, order, seed)

    def _rank_streams(self, sampler: "RankBatches", order: torch.Generator, seed: int) -> Iterator[Batch]:
        """The rank's batches with random transforms of its own: every rank would otherwise draw
        the same crops and flips for the images at the same places of its shards. Worker seeds get
        the rank mixed in; with workers=0 the transforms run here on a private stream instead of
        torch's global one (also keeping that one equal across ranks, whose shards may differ in
        size). One process keeps the plain loader (the draws it always made)."""
        w = world()
        init = functools.partial(_rank_worker_seed, w.rank) if w.distributed else None
        loader = DataLoader(self.splits["train"], batch_sampler=sampler, num_workers=self.workers, generator=order,
                            worker_init_fn=init, pin_memory=self._pinned())
        if not w.distributed or self.workers > 0:
            return self._served(loader)
        return _private_stream(self._served(loader), rank_seed(seed, w.rank))

    def _pinned(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    def sample_inputs(self, split: str, n: int, batch_size: int,
                      generator: torch.Generator) -> Iterator[torch.Tensor]:
        """n inputs of a split drawn at random without replacement (through the split's transforms)."""
        ds = self.splits[split]
        idx = torch.randperm(len(ds), generator=generator)[:n].tolist()
        for x, _ in self._served(self._loader_of(Subset(ds, idx), batch_size)):
            yield x

    def _loader_of(self, ds: Dataset, batch_size: int) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size, num_workers=self.workers, pin_memory=self._pinned())

    def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        """The split's batches in file order. Over several ranks, evaluate() uses batch i on rank
        i mod P only, so a rank reads just those; the others come as empty placeholders on the
        device."""
        ds = self.splits[split]
        if ds is None:
            return iter(())
        w = world()
        if not w.distributed:
            return self._served(self._loader(split, batch_size, None))
        return self._rank_eval(ds, batch_size, w)

    def _rank_eval(self, ds: Dataset, batch_size: int, w: World) -> Iterator[Batch]:
        n = len(ds)
        count = math.ceil(n / batch_size)
        read = [i for i in range(count) if i % w.size == w.rank]
        index = [list(range(i * batch_size, min(n, (i + 1) * batch_size))) for i in read]
        served = self._served(DataLoader(ds, batch_sampler=index, num_workers=self.workers, pin_memory=self._pinned()))
        empty = (torch.empty((0, *self.input_shape), device=self.device),
                 torch.empty(0, dtype=torch.long, device=self.device))
        wanted = set(read)
        for i in range(count):
            yield next(served) if i in wanted else empty


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


def rank_seed(seed: int, rank: int) -> int:
    """A seed for `rank`'s stream, unrelated to `seed`'s (and any other rank's): a hash of both."""
    digest = hashlib.blake2b(f"{seed} {rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _rank_worker_seed(rank: int, worker_id: int) -> None:
    """DataLoader's worker_init_fn: DataLoader seeded this worker with base_seed + worker_id, the
    same on every rank; torchvision's transforms draw from torch (random: for other transforms)."""
    seed = rank_seed(torch.initial_seed(), rank)
    torch.manual_seed(seed)
    random.seed(seed)


def _private_stream(batches: Iterator[Batch], seed: int) -> Iterator[Batch]:
    """`batches` made (in this process) with torch's global generator switched to a stream of
    its own, and switched back between batches, so no other draw sees the transforms' draws."""
    state = torch.Generator().manual_seed(seed).get_state()
    while True:
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(state)
            batch = next(batches, None)
            state = torch.get_rng_state()
        if batch is None:
            return
        yield batch


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
