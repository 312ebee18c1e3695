"""Wanda (Sun, Liu, Bair & Kolter 2023, "A simple and effective pruning approach for large
language models"): prune by weights and activations, without any weight update.

Score S_ij = |W_ij| · ‖X_j‖₂, with ‖X_j‖₂ the norm of input feature j over every calibration
token. Weights compete within their output row (the paper's comparison group), or within the
layer; with N:M, within each block of M. The authors' code goes layer by layer, each layer
scored on the inputs the pruned layers before it produce (criterion.sequential).
"""

from typing import Dict

import torch
from torch import Tensor, nn

from ..core.granularity import Granularity, Unstructured
from ..core.layerwise import SquaredNorms, feed, layer_modules
from ..core.masks import Masks
from ..config.options import WandaConfig
from ..core.select import SelectOptions, prune_rows, select_by_rank
from . import Criterion, LayerwiseCriterion, ScoreContext, UnitWeights, register


@register("wanda")
class Wanda(LayerwiseCriterion):
    """Also Wanda-sp (An et al. 2024's structured baseline): a unit's score is Σ over its features
    j of mean_i |W_ij|·‖X_j‖₂, with W the reader (o_proj / down_proj) that takes the unit's outputs."""

    cfg: WandaConfig
    granularities = LayerwiseCriterion.granularities + ("width", "heads", "mlp")

    @property
    def layerwise(self) -> bool:
        return self.cfg.sequential or self.cfg.compare == "row"

    def score(self, ctx: ScoreContext) -> Dict[str, Tensor]:
        """Every layer's scores from the network as it is (one pass over the calibration inputs)."""
        return activation_scores(ctx, self.name, wanda_scores)

    def prune(self, ctx: ScoreContext, target, granularity: Granularity = Unstructured()) -> Masks:
        if not self.layerwise:  # scores of the dense network, then any selection (scope=global too)
            return Criterion.prune(self, ctx, target, granularity)
        return super().prune(ctx, target, granularity)

    def layer_stat(self, name: str) -> SquaredNorms:
        return SquaredNorms()

    def unit_stat(self) -> SquaredNorms:
        return SquaredNorms()

    def feature_scores(self, unit: UnitWeights, stat: SquaredNorms) -> Tensor:
        return wanda_scores(unit.reader.weight.detach(), stat.value).mean(0)

    def prune_layer(self, weight: nn.Parameter, stat: SquaredNorms, mask: Tensor, fraction: float,
                    granularity: Granularity) -> Tensor:
        scores = wanda_scores(weight.detach(), stat.value)
        return prune_by_scores(weight, -scores if self.cfg.sanity == "invert" else scores, mask, fraction,
                               granularity, self.cfg)


def prune_by_scores(weight: nn.Parameter, scores: Tensor, mask: Tensor, fraction: float, granularity: Granularity,
                    cfg) -> Tensor:
    """Keep a layer's highest scores (within each row with cfg.compare=row, else the layer or its
    N:M blocks) and zero the rest of the weight in place, so the layers after it see it pruned;
    the new mask. (Wanda, RIA.)"""
    if cfg.compare == "row" and not granularity.local:
        new = prune_rows(scores, mask, fraction)
    else:
        layer_opts = SelectOptions(scope="layer", min_density=cfg.min_density)
        new = select_by_rank({"layer": scores}, Masks({"layer": mask}), fraction, layer_opts, granularity)["layer"]
    with torch.no_grad():
        weight.mul_(new.to(weight.dtype))
    return new


def activation_scores(ctx: ScoreContext, name: str, formula) -> Dict[str, Tensor]:
    """Every layer's formula(weight, Σ x_j²) from one pass of the network as it is over the
    calibration inputs. (Wanda, RIA.)"""
    params = ctx.params()
    modules = layer_modules(ctx.model, list(params), name)
    norms = {n: SquaredNorms() for n in params}
    feed(ctx.model, modules, ctx.calibration(), norms)
    return {n: formula(w.detach(), norms[n].value) for n, w in params.items()}


def wanda_scores(weight: Tensor, squared_norms: Tensor) -> Tensor:
    """|W_ij| · ‖X_j‖₂ for a weight viewed as (outputs, features), in float32 whatever the
    weight's dtype, as the authors' code: a norm over many tokens passes float16's 65504 (an
    outlier feature of RMS ~128 at 128 × 2048 tokens) and would score inf."""
    rows = weight.reshape(weight.shape[0], -1)
    norms = squared_norms.sqrt().float()
    return (rows.abs().float() * norms.unsqueeze(0)).reshape(weight.shape)
