"""Synthetic classification data: Gaussian clusters around random class prototypes.

Tiny and generated on the spot, for tests and smoke runs; its own seed, so every run seed
sees the same data.
"""


import torch

from ..config.options import SyntheticConfig
from . import TensorData, register


@register("synthetic")
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
