"""What a training phase tells its events to (as OpenLTH's callbacks): mask updates, the rewind
point, the epoch's record, checkpoints. Schedules act inside training through these."""

from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

import torch
from torch import nn

from ..core.masks import Masks

if TYPE_CHECKING:
    from .loop import EpochResult, Loop


class Hook:
    """What a training phase tells its events to (as OpenLTH's callbacks): mask updates, the
    rewind point, the epoch's record, checkpoints. fit calls each hook's methods in the order the
    hooks are given; those a hook does not override cost nothing."""


    def before_step(self, loop: "Loop") -> None:
        """Before the optimizer step `loop.step`."""


    def after_step(self, loop: "Loop", batch: Tuple[torch.Tensor, torch.Tensor]) -> None:
        """After optimizer step `loop.step` (1-based within the phase) on `batch`."""


    def epoch_end(self, loop: "Loop", result: EpochResult) -> None:
        """After epoch `result.epoch` (the LR schedule has stepped)."""


class MaskUpdates(Hook):
    """A hook that changes the masks while a phase trains (gradual pruning, SET, RigL)."""


    def due(self, step: int) -> bool:
        raise NotImplementedError


    def update(self, step: int, model: nn.Module, batch: Tuple[torch.Tensor, torch.Tensor]) -> Masks:
        """The masks to train on from here (`batch`: the step's own mini-batch)."""
        raise NotImplementedError


    def after_step(self, loop: "Loop", batch) -> None:
        if self.due(loop.step):
            loop.set_masks(self.update(loop.step, loop.model, batch))
            loop.model.train()  # the update may have evaluated the model
