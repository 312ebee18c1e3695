"""Random pruning: i.i.d. uniform scores, drawn from the run's seeded generator."""

from typing import Dict, Optional

import torch
from torch import Tensor

from . import Criterion, ScoreContext, UnitWeights, register


@register("random")
class Random(Criterion):
    granularities = Criterion.granularities + ("width", "heads", "mlp", "experts")

    def score(self, ctx: ScoreContext) -> Dict[str, Tensor]:
        out = {}
        for n, m in ctx.masks.items():
            # drawn on the CPU so the same seed gives the same masks on any device
            out[n] = torch.rand(m.shape, generator=ctx.generator).to(m.device)
        return out

    def feature_scores(self, unit: UnitWeights, stat=None) -> Tensor:
        """Uniform scores per feature: every unit's sum has the same distribution (heads, channels)."""
        return torch.rand(unit.reader.in_features, generator=unit.generator)

    def kv_scores(self, unit: UnitWeights) -> Optional[Tensor]:
        return torch.rand(unit.kv[0].out_features, generator=unit.generator) if unit.kv else None

    def expert_scores(self, stat, experts: int, generator: Optional[torch.Generator]) -> Tensor:
        """Uniform scores: the experts removed are a uniform draw (the sanity baseline of expert pruning)."""
        return torch.rand(experts, generator=generator, dtype=torch.float64)
