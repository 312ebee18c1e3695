"""Magnitude increase (Zhou et al. 2019, "Deconstructing Lottery Tickets"): S(θ) = |θ| − |θ0|."""

from typing import Dict

from torch import Tensor

from . import Criterion, ScoreContext, register, weights_of


@register("magnitude_increase")
class MagnitudeIncrease(Criterion):
    granularities = Criterion.granularities + ("width", "heads", "mlp")  # also a ViT's heads and MLP channels
    needs_trained = True  # |θ| − |θ0| is zero before training

    def score(self, ctx: ScoreContext) -> Dict[str, Tensor]:
        if ctx.init_state is None:
            raise ValueError("magnitude_increase needs the initial weights θ0 (ScoreContext.init_state)")
        return {n: w.abs() - ctx.init_state[n].to(w.device).abs()
                for n, w in weights_of(ctx.model, ctx.masks).items()}
