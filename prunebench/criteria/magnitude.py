"""Magnitude pruning: S(θ) = |θ|.

With granularity=filter and granularity.reduce=l1 this is Li et al. 2017 ("Pruning Filters for
Efficient ConvNets"): a filter's score is Σ|w| over its kernels. Their two ways of scoring
consecutive layers are `channel_scoring`: `independent` scores every layer on its trained
weights; `greedy` goes layer by layer and leaves out the kernels that read channels the
previous layers just removed.
"""

from typing import Dict

from torch import Tensor

from ..core.granularity import Granularity, Unstructured, only
from ..core.masks import Masks
from ..core.select import SelectOptions, layers_in_scope, stage_of
from . import Criterion, ScoreContext, register, weights_of


@register("magnitude")
class Magnitude(Criterion):
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
