"""Magnitude pruning: S(θ) = |θ|.

With granularity=filter and granularity.reduce=l1 this is Li et al. 2017 ("Pruning Filters for
Efficient ConvNets"): a filter's score is Σ|w| over its kernels. Their two ways of scoring
consecutive layers are `channel_scoring`: `independent` scores every layer on its trained
weights; `greedy` goes layer by layer and leaves out the kernels that read channels the
previous layers just removed.
"""

from typing import Dict, Optional

from torch import Tensor

from ..core.granularity import Granularity, Unstructured, only
from ..core.masks import Masks
from ..core.select import SelectOptions, layers_in_scope, stage_of
from . import Criterion, ScoreContext, UnitWeights, register, weights_of

STRUCTURES = ("width", "heads", "mlp")  # language models' units: the squared L2 norm of their weights


@register("magnitude")
class Magnitude(Criterion):
    granularities = Criterion.granularities + STRUCTURES

    def score(self, ctx: ScoreContext) -> Dict[str, Tensor]:
        return {n: w.abs() for n, w in weights_of(ctx.model, ctx.masks).items()}

    def select(self, scores: Dict[str, Tensor], ctx: ScoreContext, target,
               granularity: Granularity = Unstructured()) -> Masks:
        if self.cfg.channel_scoring == "independent" or not granularity.structured:
            return super().select(scores, ctx, target, granularity)
        masks = ctx.masks
        opts = SelectOptions.of(self.cfg)
        owners = layers_in_scope(masks, opts, granularity)
        if opts.scope == "layer":  # the per-layer ratio that `target` of all units means
            per_layer = target * granularity.total(masks) / sum(granularity.group_count(n, masks) for n in owners)
        for name in owners:
            ratio = per_layer if opts.scope == "layer" else (
                target if isinstance(target, (int, float)) else target[stage_of(name, granularity)])
            current = {n: s * masks[n] for n, s in scores.items()}  # the kernels still there now
            masks = self.rank(current, masks, ratio, only(granularity, [name]))
        return masks

    def feature_scores(self, unit: UnitWeights, stat=None) -> Tensor:
        """Σ w² over the reader's column j and row j of every writer: summed over a unit's features,
        the squared L2 norm of the unit's weights (the same ranking as the norm)."""
        score = unit.reader.weight.detach().float().pow(2).sum(0)
        for writer in unit.writers:
            score = score + writer.weight.detach().float().pow(2).sum(1)
        return score

    def kv_scores(self, unit: UnitWeights) -> Optional[Tensor]:
        return sum(layer.weight.detach().float().pow(2).sum(1) for layer in unit.kv) if unit.kv else None
