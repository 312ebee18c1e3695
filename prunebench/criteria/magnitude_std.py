"""Han et al. 2015, "Learning both Weights and Connections": a per-layer threshold.

A weight is pruned when |w| < quality × std(W), with std taken over the layer's trained
weights before the first pruning (the threshold does not drift as weights are removed).
The achieved sparsity is the outcome of the threshold, not a target. With an iterative
schedule, round r of R uses quality × r/R, so the last round applies the full threshold.
"""

from typing import Dict

from torch import Tensor

from ..config import ConfigError
from ..core.granularity import Granularity, Unstructured
from ..core.masks import Masks
from ..config.options import MagnitudeStdConfig
from ..core.select import SelectOptions, select_by_threshold
from . import Criterion, ScoreContext, register, weights_of


@register("magnitude_std")
class MagnitudeStd(Criterion):
    needs_trained = True  # sets its own sparsity from a trained layer's std
    # Han et al. threshold single weights
    granularities = ("unstructured",)
    sets_own_sparsity = True

    def __init__(self, cfg: MagnitudeStdConfig):
        super().__init__(cfg)
        self.stds: Dict[str, float] = {}

    def validate(self, model, masks: Masks) -> None:
        unknown = set(self.cfg.layer_quality) - set(masks.names())
        if unknown:
            raise ConfigError(f"criterion.layer_quality names unknown layers {sorted(unknown)}; "
                              f"the prunable layers are {', '.join(masks.names())}")

    def score(self, ctx: ScoreContext) -> Dict[str, Tensor]:
        weights = weights_of(ctx.model, ctx.masks)
        if not self.stds:  # the layer's trained, still dense weights
            self.stds = {n: float(w.std()) for n, w in weights.items()}
        # score = |w| / std, so the threshold on it is the quality itself
        return {n: w.abs() / self.stds[n] for n, w in weights.items()}

    def select(self, scores: Dict[str, Tensor], ctx: ScoreContext, target: float,
               granularity: Granularity = Unstructured()) -> Masks:
        ramp = ctx.round / ctx.rounds
        thresholds = {n: ramp * self.cfg.layer_quality.get(n, self.cfg.quality) for n in scores}
        return select_by_threshold(scores, ctx.masks, thresholds, SelectOptions.of(self.cfg), granularity)
