"""Schedules: *when* the parts run. One file each, registered by name (`schedule=<name>`):

    rounds.py   oneshot, iterative: pretrain → for each round: score → select → retrain policy → finetune
    gradual.py  pruning inside one training run on Zhu & Gupta's cubic
    dynamic.py  sparse from the start, masks that move (SET, RigL)

A schedule's rules that need only the config are its config class's (config/, torch-free:
`check_with`, `targets`, `inside_training`); those that need the built run are its `check`,
called by runs/experiment.build before any training. steps.py holds what they share: one
pruning step, training then fine-tuning under mask updates, the compacted network, the row's
size figures.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Callable, Dict, Optional, Type

from torch import nn

from ..config import ScheduleConfig
from ..config.registry import Registry

if TYPE_CHECKING:
    from ..runs.state import RunState


class Schedule:
    """A schedule: what it refuses before any training, and the run it drives."""

    # whether several processes (torchrun) can run it: masks that change from each step's batch
    # inside training would need the ranks to agree at every update
    multi_process: bool = True

    def __init__(self, cfg: ScheduleConfig):
        self.cfg = cfg

    @property
    def name(self) -> str:
        return self.cfg.name

    def check(self, cfg, criterion, granularity, masks, data) -> None:
        """Raise ConfigError for what this schedule cannot run with the built pieces."""

    def run(self, run: "RunState", resumed: Optional[Dict]) -> Optional[nn.Module]:
        """The whole schedule on `run` (resumed: the state of the phase a checkpoint stopped in);
        returns the compacted network of structured pruning, else None."""
        raise NotImplementedError


SCHEDULES = Registry("schedule")


def register(*names: str) -> Callable[[Type[Schedule]], Type[Schedule]]:
    """Class decorator: make a schedule available as `schedule=<name>`, for each of `names`."""

    def wrap(cls: Type[Schedule]) -> Type[Schedule]:
        for name in names:
            SCHEDULES.register(name)(cls)
        return cls

    return wrap


def build_schedule(cfg: ScheduleConfig) -> Schedule:
    return SCHEDULES.get(cfg.name)(cfg)


# import every module in this package so each registers itself
for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
