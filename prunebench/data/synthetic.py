"""Synthetic classification data: Gaussian clusters around random class prototypes.

Tiny and generated on the spot, for tests and smoke runs; its own seed, so every run seed
sees the same data.
"""

from dataclasses import dataclass, field
from typing import List

import torch

from ..config import DatasetConfig, check
from . import TensorData, register


@dataclass
class SyntheticConfig(DatasetConfig):
    num_train: int = 1024
    num_test: int = 512
    num_classes: int = 10
    shape: List[int] = field(default_factory=lambda: [1, 28, 28])
    noise: float = 8.0  # noise std around each unit-variance prototype (LeNet-300-100: ~75% test acc)
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check(self.num_train > 0 and self.num_test > 0, "dataset.num_train and dataset.num_test must be > 0")
        check(self.num_classes >= 2, f"dataset.num_classes must be >= 2, got {self.num_classes}")
        check(len(self.shape) == 3 and all(s > 0 for s in self.shape),
              f"dataset.shape must be [channels, height, width], got {list(self.shape)}")
        check(self.noise >= 0, f"dataset.noise must be >= 0, got {self.noise}")


@register("synthetic", SyntheticConfig)
def load_synthetic(cfg: SyntheticConfig, data_dir: str) -> TensorData:
    g = torch.Generator().manual_seed(cfg.seed)
    shape = tuple(cfg.shape)
    prototypes = torch.randn((cfg.num_classes,) + shape, generator=g)

    def sample(n):
        y = torch.arange(n) % cfg.num_classes  # balanced classes
        y = y[torch.randperm(n, generator=g)]
        x = prototypes[y] + cfg.noise * torch.randn((n,) + shape, generator=g)
        return x, y

    x_train, y_train = sample(cfg.num_train)
    x_test, y_test = sample(cfg.num_test)
    return TensorData("synthetic", x_train, y_train, x_test, y_test, cfg.num_classes)
