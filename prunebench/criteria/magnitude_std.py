"""Han et al. 2015, "Learning both Weights and Connections": a per-layer threshold.

A weight is pruned when |w| < quality × std(W), with std taken over the layer's trained
weights before the first pruning (the threshold does not drift as weights are removed).
The achieved sparsity is the outcome of the threshold, not a target. With an iterative
schedule, round r of R uses quality × r/R, so the last round applies the full threshold.
"""

from dataclasses import dataclass, field
from typing import Dict

from torch import Tensor

from ..config import ConfigError, CriterionConfig, check
from ..granularity import Granularity, Unstructured
from ..masks import Masks
from ..select import SelectOptions, select_by_threshold
from . import Criterion, ScoreContext, register, weights_of


@dataclass
class MagnitudeStdConfig(CriterionConfig):
    scope: str = "layer"  # the threshold is per layer by definition
    quality: float = 1.0  # λ: prune |w| < λ·std(W)
    # λ per layer (the paper tunes it per layer), keyed by weight name: {"fc3.weight": 0.5}
    layer_quality: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        check(self.quality >= 0, f"criterion.quality must be >= 0, got {self.quality}")
        for name, q in self.layer_quality.items():
            check(q >= 0, f"criterion.layer_quality[{name}] must be >= 0, got {q}")
        check(self.scope == "layer", "criterion=magnitude_std thresholds each layer by its own std: "
              f"criterion.scope must be layer, got {self.scope}")
        check(self.sanity != "invert", "criterion.sanity=invert needs a criterion that ranks; "
              "magnitude_std thresholds (use shuffle, or criterion=magnitude)")


@register("magnitude_std", MagnitudeStdConfig)
class MagnitudeStd(Criterion):
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
