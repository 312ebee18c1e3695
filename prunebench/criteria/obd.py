"""Optimal Brain Damage (LeCun et al. 1990): saliency s_q = ½ H_qq θ_q².

The loss increase a quadratic model predicts for removing weight q alone, with the Hessian
taken as diagonal. H_qq comes from `estimator` (see core/curvature.py): the empirical Fisher, the
Fisher with labels sampled from the model, the exact Gauss-Newton diagonal, or Hutchinson's
estimate of the Hessian diagonal; over `samples` training examples.
"""

from typing import Dict, List, Optional, Tuple

from torch import Tensor

from ..core import curvature
from ..core.masks import Masks
from ..config.options import OBDConfig
from . import Criterion, ScoreContext, register


def take_examples(batches, n: int) -> List[Tuple[Tensor, Tensor]]:
    """The first n examples of the shuffled training batches (as batches)."""
    out, have = [], 0
    for x, y in batches():
        out.append((x[:n - have], y[:n - have]))
        have += out[-1][1].shape[0]
        if have >= n:
            break
    return out


def hessian_diagonal(cfg: OBDConfig, ctx: ScoreContext) -> Dict[str, Tensor]:
    names = ctx.masks.names()
    data = take_examples(ctx.batches, cfg.samples)
    if cfg.estimator == "empirical_fisher":
        return curvature.fisher_diagonal(ctx.model, names, data, memory=ctx.memory)
    if cfg.estimator == "fisher":
        return curvature.fisher_diagonal(ctx.model, names, data, sample_labels=True, generator=ctx.generator,
                                         memory=ctx.memory)
    if cfg.estimator == "ggn":
        return curvature.ggn_diagonal(ctx.model, names, data, memory=ctx.memory)
    return curvature.hutchinson_diagonal(ctx.model, names, data, cfg.probes, generator=ctx.generator)


@register("obd")
class OBD(Criterion):
    granularities = Criterion.granularities + ("width", "heads", "mlp")  # also a ViT's heads and MLP channels

    def memory_need(self, model, masks: Masks, num_classes: int) -> Optional[Tuple[int, str]]:
        size = curvature.parameter_bytes(model, masks.names())  # one |θ|-sized tensor
        if self.cfg.estimator == "ggn":  # one class column of one example, squared, and the sum
            return 3 * size, "one class column of the Gauss-Newton diagonal (3 × |θ| floats)"
        if self.cfg.estimator == "hutchinson":  # gradient with graph, probe, Hz, sum (+ one batch's graph)
            return 4 * size, "Hutchinson's gradient, probe, Hz and sum (4 × |θ| floats, and one batch's graph)"
        return 3 * size, "one example's gradient, squared, and the sum (3 × |θ| floats)"

    def score(self, ctx: ScoreContext) -> Dict[str, Tensor]:
        h = hessian_diagonal(self.cfg, ctx)
        return {n: 0.5 * h[n] * p.detach().pow(2) for n, p in ctx.params().items()}
