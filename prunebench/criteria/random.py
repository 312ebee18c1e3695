"""Random pruning: i.i.d. uniform scores, drawn from the run's seeded generator."""

from typing import Dict

import torch
from torch import Tensor

from . import Criterion, ScoreContext, register


@register("random")
class Random(Criterion):
    def score(self, ctx: ScoreContext) -> Dict[str, Tensor]:
        out = {}
        for n, m in ctx.masks.items():
            # drawn on the CPU so the same seed gives the same masks on any device
            out[n] = torch.rand(m.shape, generator=ctx.generator).to(m.device)
        return out
