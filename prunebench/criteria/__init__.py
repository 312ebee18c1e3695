"""Pruning criteria: one file each, found by name through a small registry.

A criterion turns a model into weight-shaped importance scores (higher = keep). To add one,
write `criteria/<name>.py` with a `Criterion` subclass decorated by `@register("<name>")`
(and its own config dataclass if it has options), then `conf/criterion/<name>.yaml`
starting from `criterion_<name>_schema`. Nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Type

import torch
from hydra.core.config_store import ConfigStore
from torch import Tensor, nn

from ..config import ConfigError, CriterionConfig
from ..granularity import Granularity, Unstructured
from ..masks import Masks
from ..select import SelectOptions, select_by_rank


@dataclass
class ScoreContext:
    """What a criterion may look at when it scores."""

    model: nn.Module
    masks: Masks
    round: int = 1  # 1-based pruning round
    init_state: Optional[Dict[str, Tensor]] = None  # θ0 (state_dict at initialisation)
    # (x, y) mini-batches of training data, for data-driven criteria
    batches: Optional[Callable[[], Iterator[Tuple[Tensor, Tensor]]]] = None
    generator: Optional[torch.Generator] = None  # for criteria that draw random numbers
    rounds: int = 1  # total number of rounds in the schedule


class Criterion:
    """Base class. `score` is the paper's formula; `select` and `compensate` have defaults."""

    name: str = ""
    # True when the criterion decides how much to prune (a threshold) instead of a target
    sets_own_sparsity: bool = False

    def __init__(self, cfg: CriterionConfig):
        self.cfg = cfg

    def validate(self, model: nn.Module, masks: Masks) -> None:
        """Raise ConfigError for options that do not fit this model (runs before any training)."""

    def score(self, ctx: ScoreContext) -> Dict[str, Tensor]:
        raise NotImplementedError

    def select(self, scores: Dict[str, Tensor], ctx: ScoreContext, target: float,
               granularity: Granularity = Unstructured()) -> Masks:
        return select_by_rank(scores, ctx.masks, target, SelectOptions.of(self.cfg), granularity)

    def compensate(self, model: nn.Module, masks: Masks, ctx: ScoreContext) -> None:
        """Update the surviving weights after pruning (only OBS-type methods do)."""


CRITERIA: Dict[str, Type[Criterion]] = {}


def register(name: str, config: Type[CriterionConfig] = CriterionConfig):
    """Class decorator: make a criterion available as `criterion=<name>`."""

    def wrap(cls: Type[Criterion]) -> Type[Criterion]:
        if name in CRITERIA:
            raise ValueError(f"criterion {name!r} registered twice")
        cls.name = name
        cls.config_class = config
        CRITERIA[name] = cls
        ConfigStore.instance().store(name=f"criterion_{name}_schema", node=config)
        return cls

    return wrap


def build_criterion(cfg: CriterionConfig) -> Criterion:
    if cfg.name not in CRITERIA:
        raise ConfigError(f"criterion={cfg.name!r} is not one of: {', '.join(sorted(CRITERIA))}")
    return CRITERIA[cfg.name](cfg)


def weights_of(model: nn.Module, masks: Masks) -> Dict[str, Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach() for n in masks}


ConfigStore.instance().store(name="criterion_schema", node=CriterionConfig)

# import every module in this package so each registers itself
for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
