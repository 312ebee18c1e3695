"""Models by name; each adapts to the dataset's input shape and number of classes."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Tuple

import torch
from torch import nn

from ..config import ConfigError, ModelConfig
from ..config.registry import Registry

Builder = Callable[[ModelConfig, Tuple[int, ...], int], nn.Module]
MODELS = Registry("model")
register = MODELS.register  # function decorator: make a builder available as `model=<name>`


def default_config(name: str) -> ModelConfig:
    """A registered model's config with its defaults (for scripts and tests)."""
    return MODELS.options(name)(name=name)


def build_model(cfg: ModelConfig, input_shape: Tuple[int, ...], num_classes: int) -> nn.Module:
    if cfg.source == "torchvision":
        from .torchvision_models import build_torchvision

        model = build_torchvision(cfg, tuple(input_shape), num_classes)
    else:
        model = MODELS.get(cfg.name)(cfg, tuple(input_shape), num_classes)
    initialize(model, cfg.init)
    return model


@torch.no_grad()
def initialize(model: nn.Module, scheme: str) -> None:
    """Re-draw every Conv/Linear weight with `scheme` (biases to zero); 'default' keeps PyTorch's."""
    if scheme == "default":
        return
    for m in model.modules():
        if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        if scheme == "kaiming_normal":
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif scheme == "kaiming_uniform":
            nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
        elif scheme == "xavier_normal":  # variance scaling (Glorot), as in SNIP
            nn.init.xavier_normal_(m.weight)
        elif scheme == "orthogonal":
            nn.init.orthogonal_(m.weight)
        elif scheme == "delta_orthogonal":  # Xiao et al. 2018: orthogonal centre tap, zeros elsewhere
            delta_orthogonal_(m.weight)
        else:
            raise ConfigError(f"model.init={scheme!r} is unknown")
        if m.bias is not None:
            m.bias.zero_()


@torch.no_grad()
def delta_orthogonal_(weight: torch.Tensor) -> None:
    """Convolutions: an orthogonal out × in matrix at the kernel's centre, zero elsewhere (a
    dynamical-isometry init, Xiao et al. 2018); Linear layers: plain orthogonal."""
    if weight.dim() <= 2:
        nn.init.orthogonal_(weight)
        return
    centre = tuple(k // 2 for k in weight.shape[2:])
    weight.zero_()
    nn.init.orthogonal_(weight[(slice(None), slice(None)) + centre])


for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
