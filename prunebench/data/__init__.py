"""Datasets by name.

Datasets that fit in memory are `TensorData`: normalised tensors on the training device, a
batch is an index slice, augmentation runs batched on the device. Larger ones (imagefolder)
stream through a DataLoader with workers (`LoaderData`). Both offer the same three calls:
`train_batches`, `eval_batches` and `num_examples`.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional, Tuple

import torch
from torch import Tensor

from ..config import ConfigError, DatasetConfig
from ..config.registry import Registry
from ..core.distributed import shard

Batch = Tuple[Tensor, Tensor]


@dataclass
class Augment:
    """Random crop of a zero-padded image and random horizontal flip, for a whole batch at once."""

    padding: int = 4
    flip: bool = True

    def __call__(self, x: Tensor, fill: Tensor, generator: torch.Generator) -> Tensor:
        n, c, h, w = x.shape
        p = self.padding
        dy, dx, flip = self.draws(n, generator, x.device)
        if p:
            padded = fill.to(x.dtype).view(1, c, 1, 1).expand(n, c, h + 2 * p, w + 2 * p).clone()
            padded[:, :, p:p + h, p:p + w] = x
        else:
            padded = x
        rows = dy[:, None] + torch.arange(h, device=x.device)  # n, h
        cols = torch.arange(w, device=x.device).expand(n, w)
        if self.flip:
            cols = torch.where(flip[:, None] != 0, w - 1 - cols, cols)
        cols = dx[:, None] + cols  # n, w
        # one gather: out[i, :, r, s] = padded[i, :, rows[i, r], cols[i, s]]
        batch = torch.arange(n, device=x.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    def draws(self, n: int, generator: torch.Generator, device: torch.device) -> Tuple[Tensor, Tensor, Tensor]:
        """Row and column offsets and flips (0/1) of n images: drawn on the CPU generator (the same
        draws on any device), moved in one copy, pinned and asynchronous on a GPU, so that the
        host never waits for the device's previous step."""
        dy = torch.randint(0, 2 * self.padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * self.padding + 1, (n,), generator=generator)
        flip = (torch.rand(n, generator=generator) < 0.5).long() if self.flip else torch.zeros(n, dtype=torch.long)
        packed = torch.stack([dy, dx, flip])
        if device.type == "cuda" and torch.cuda.is_available():
            packed = packed.pin_memory()
        return tuple(packed.to(device, non_blocking=True))


@dataclass
class TensorData:
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    x_val: Optional[Tensor] = None
    y_val: Optional[Tensor] = None
    # the normalised value of a black pixel, per channel: what augmentation pads with
    pixel_zero: Optional[Tensor] = None
    augment: Optional[Augment] = None

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def num_examples(self, split: str) -> int:
        y = {"train": self.y_train, "val": self.y_val, "test": self.y_test}[split]
        return 0 if y is None else int(y.shape[0])

    def to(self, device) -> "TensorData":
        def move(t):
            return None if t is None else t.to(device)

        return replace(self, x_train=move(self.x_train), y_train=move(self.y_train), x_test=move(self.x_test),
                       y_test=move(self.y_test), x_val=move(self.x_val), y_val=move(self.y_val),
                       pixel_zero=move(self.pixel_zero))

    def with_validation(self, size: int, seed: int) -> "TensorData":
        """Move `size` training examples (a fixed random choice) into a validation split."""
        if size == 0:
            return self
        n = self.num_examples("train")
        if size >= n:
            raise ConfigError(f"dataset.val_size={size} leaves no training data ({n} examples)")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(self.x_train.device)
        val, train = order[:size], order[size:]
        return replace(self, x_train=self.x_train[train], y_train=self.y_train[train],
                       x_val=self.x_train[val], y_val=self.y_train[val])

    def train_batches(self, batch_size: int, generator: torch.Generator, rank_shard: bool = False) -> Iterator[Batch]:
        """One epoch of shuffled (and, if configured, augmented) mini-batches; with `rank_shard`,
        this rank's contiguous part of each (the whole batch is drawn and augmented first, so every
        rank's random stream stays the single process's)."""
        n = self.x_train.shape[0]
        order = torch.randperm(n, generator=generator).to(self.x_train.device)
        fill = self.pixel_zero if self.pixel_zero is not None else self.x_train.new_zeros(self.x_train.shape[1])
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x = self.x_train[idx]
            if self.augment is not None:
                x = self.augment(x, fill, generator)
            yield (shard(x), shard(self.y_train[idx])) if rank_shard else (x, self.y_train[idx])

    def sample_inputs(self, split: str, n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
        """n inputs of a split drawn at random without replacement, unaugmented, in batches."""
        x = {"train": self.x_train, "val": self.x_val}[split]
        idx = torch.randperm(x.shape[0], generator=generator)[:n].to(x.device)
        for start in range(0, idx.numel(), batch_size):
            yield x[idx[start:start + batch_size]]

    def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        x, y = {"test": (self.x_test, self.y_test), "val": (self.x_val, self.y_val)}[split]
        for start in range(0, x.shape[0], batch_size):
            yield x[start:start + batch_size], y[start:start + batch_size]


Loader = Callable[[DatasetConfig, str], TensorData]
DATASETS = Registry("dataset")
register = DATASETS.register  # function decorator: make a loader available as `dataset=<name>`


def build_dataset(cfg: DatasetConfig, data_dir: str):
    """The dataset with its validation split and augmentation as configured (on the CPU)."""
    data = DATASETS.get(cfg.name)(cfg, data_dir)
    if isinstance(data, TensorData):
        if cfg.augment and len(data.input_shape) != 3:
            raise ConfigError(f"dataset.augment needs image data [C, H, W], {cfg.name} has {list(data.input_shape)}")
        data = data.with_validation(cfg.val_size, cfg.split_seed)
        data.augment = Augment(cfg.crop_padding, cfg.flip) if cfg.augment else None
    return data


for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
