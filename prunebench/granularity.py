"""What a pruning decision removes: single weights, or whole groups of them.

A granularity reduces a weight-shaped score to one score per group and expands a per-group
keep decision back to a weight-shaped mask. Selection (select.py) only sees groups, so
filter/channel pruning is a new class here, not a change to selection.
"""

from __future__ import annotations

from typing import Dict, Type

import torch
from torch import Tensor

from .config import ConfigError


class Granularity:
    name: str = ""

    def group_scores(self, score: Tensor) -> Tensor:
        """Weight-shaped score -> one score per group (1-D)."""
        raise NotImplementedError

    def group_size(self, shape: torch.Size) -> int:
        """Weights per group (groups of one layer are of equal size)."""
        raise NotImplementedError

    def alive(self, mask: Tensor) -> Tensor:
        """Weight-shaped mask -> bool per group: False where the group is already pruned."""
        raise NotImplementedError

    def expand(self, keep: Tensor, shape: torch.Size) -> Tensor:
        """Bool per group -> weight-shaped bool mask."""
        raise NotImplementedError


class Unstructured(Granularity):
    name = "unstructured"

    def group_scores(self, score: Tensor) -> Tensor:
        return score.reshape(-1)

    def group_size(self, shape: torch.Size) -> int:
        return 1

    def alive(self, mask: Tensor) -> Tensor:
        return mask.reshape(-1) != 0

    def expand(self, keep: Tensor, shape: torch.Size) -> Tensor:
        return keep.reshape(shape)


GRANULARITIES: Dict[str, Type[Granularity]] = {"unstructured": Unstructured}


def build_granularity(name: str) -> Granularity:
    if name not in GRANULARITIES:
        raise ConfigError(f"granularity={name!r} is not one of: {', '.join(sorted(GRANULARITIES))}")
    return GRANULARITIES[name]()
