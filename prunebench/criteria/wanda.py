"""Wanda (Sun, Liu, Bair & Kolter 2023, "A simple and effective pruning approach for large
language models"): prune by weights and activations, without any weight update.

Score S_ij = |W_ij| · ‖X_j‖₂, with ‖X_j‖₂ the norm of input feature j over every calibration
token. Weights compete within their output row (the paper's comparison group), or within the
layer; with N:M, within each block of M. The authors' code goes layer by layer, each layer
scored on the inputs the pruned layers before it produce (criterion.sequential).
"""

from typing import Dict

import torch
from torch import Tensor

from ..granularity import Granularity, Unstructured
from ..layerwise import SquaredNorms, feed, layer_by_layer, layer_modules
from ..masks import Masks
from ..options import WandaConfig
from ..select import SelectOptions, layer_fractions, prune_rows, select_by_rank
from . import Criterion, ScoreContext, register


def calibration_of(ctx: ScoreContext, name: str):
    if ctx.calibration is None:
        raise ValueError(f"criterion={name} needs calibration inputs (ScoreContext.calibration)")
    return ctx.calibration()


@register("wanda")
class Wanda(Criterion):
    granularities = ("unstructured", "nm")
    calibrates = True
    cfg: WandaConfig

    def validate(self, model, masks: Masks) -> None:
        layer_modules(model, masks.names(), self.name)

    @property
    def layerwise(self) -> bool:
        return self.cfg.sequential or self.cfg.compare == "row"

    def score(self, ctx: ScoreContext) -> Dict[str, Tensor]:
        """Every layer's scores from the network as it is (one pass over the calibration inputs)."""
        params = ctx.params()
        modules = layer_modules(ctx.model, list(params), self.name)
        norms = {n: SquaredNorms() for n in params}
        feed(ctx.model, modules, calibration_of(ctx, self.name), norms)
        return {n: wanda_scores(w.detach(), norms[n].value) for n, w in params.items()}

    def prune(self, ctx: ScoreContext, target, granularity: Granularity = Unstructured()) -> Masks:
        if not self.layerwise:  # scores of the dense network, then any selection
            return super().prune(ctx, target, granularity)
        opts = SelectOptions.of(self.cfg)
        fractions = layer_fractions(target, ctx.masks, opts, granularity)
        params = ctx.params()
        new = dict(ctx.masks.items())

        def prune_layer(name: str, norms: SquaredNorms) -> None:
            scores = wanda_scores(params[name].detach(), norms.value)
            if self.cfg.sanity == "invert":
                scores = -scores
            new[name] = self.select_layer(name, scores, ctx.masks, fractions[name], granularity, opts)
            with torch.no_grad():
                params[name].mul_(new[name])  # the layers after it see it pruned

        modules = layer_modules(ctx.model, list(fractions), self.name)
        layer_by_layer(ctx.model, modules, calibration_of(ctx, self.name), self.cfg.sequential,
                       lambda _: SquaredNorms(), prune_layer, self.cfg.sequential_unit)
        return Masks(new)

    def select_layer(self, name: str, scores: Tensor, masks: Masks, fraction: float, granularity: Granularity,
                     opts: SelectOptions) -> Tensor:
        if self.cfg.compare == "row" and not granularity.local:
            return prune_rows(scores, masks[name], fraction)
        one = Masks({name: masks[name]})
        layer_opts = SelectOptions(scope="layer", min_density=opts.min_density)
        return select_by_rank({name: scores}, one, fraction, layer_opts, granularity)[name]


def wanda_scores(weight: Tensor, squared_norms: Tensor) -> Tensor:
    """|W_ij| · ‖X_j‖₂ for a weight viewed as (outputs, features)."""
    rows = weight.reshape(weight.shape[0], -1)
    norms = squared_norms.sqrt().to(rows.dtype)
    return (rows.abs() * norms.unsqueeze(0)).reshape(weight.shape)
