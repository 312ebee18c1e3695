"""Datasets, held in memory as tensors (on the training device) and sliced into batches."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Tuple, Type

import torch
from hydra.core.config_store import ConfigStore
from torch import Tensor

from ..config import ConfigError, DatasetConfig


@dataclass
class TensorData:
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device) -> "TensorData":
        return TensorData(self.name, self.x_train.to(device), self.y_train.to(device),
                          self.x_test.to(device), self.y_test.to(device), self.num_classes)

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Tuple[Tensor, Tensor]]:
        """One epoch of shuffled mini-batches: index slices of the in-memory tensors."""
        n = self.x_train.shape[0]
        order = torch.randperm(n, generator=generator).to(self.x_train.device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield self.x_train[idx], self.y_train[idx]


Loader = Callable[[DatasetConfig, str], TensorData]
DATASETS: Dict[str, Loader] = {}


def register(name: str, config: Type[DatasetConfig] = DatasetConfig):
    def wrap(fn: Loader) -> Loader:
        DATASETS[name] = fn
        ConfigStore.instance().store(name=f"dataset_{name}_schema", node=config)
        return fn

    return wrap


def build_dataset(cfg: DatasetConfig, data_dir: str) -> TensorData:
    if cfg.name not in DATASETS:
        raise ConfigError(f"dataset={cfg.name!r} is not one of: {', '.join(sorted(DATASETS))}")
    return DATASETS[cfg.name](cfg, data_dir)


ConfigStore.instance().store(name="dataset_schema", node=DatasetConfig)

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
