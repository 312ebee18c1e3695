"""Sparsity and size, counted from the zeros really present in the weights (not the masks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, List

from torch import nn


@dataclass
class LayerStats:
    layer: str
    shape: List[int]
    params: int
    nonzero: int

    @property
    def density(self) -> float:
        return self.nonzero / self.params


@dataclass
class WeightStats:
    params_total: int  # every parameter (weights, biases, norm layers)
    params_nonzero: int
    prunable_total: int  # Conv/Linear weights (the masks' parameters)
    prunable_nonzero: int
    layers: List[LayerStats] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros among the prunable weights."""
        return 1.0 - self.prunable_nonzero / self.prunable_total

    @property
    def compression(self) -> float:
        """All parameters / nonzero parameters."""
        return self.params_total / max(1, self.params_nonzero)


def weight_stats(model: nn.Module, prunable: Iterable[str]) -> WeightStats:
    params = dict(model.named_parameters())
    layers = [LayerStats(n, list(params[n].shape), params[n].numel(), int(params[n].count_nonzero()))
              for n in prunable]
    return WeightStats(
        params_total=sum(p.numel() for p in params.values()),
        params_nonzero=sum(int(p.count_nonzero()) for p in params.values()),
        prunable_total=sum(s.params for s in layers),
        prunable_nonzero=sum(s.nonzero for s in layers),
        layers=layers)
