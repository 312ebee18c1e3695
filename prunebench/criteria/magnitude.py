"""Magnitude pruning: S(θ) = |θ|."""

from typing import Dict

from torch import Tensor

from . import Criterion, ScoreContext, register, weights_of


@register("magnitude")
class Magnitude(Criterion):
    def score(self, ctx: ScoreContext) -> Dict[str, Tensor]:
        return {n: w.abs() for n, w in weights_of(ctx.model, ctx.masks).items()}
