"""FLAP (An, Zhao, Yu, Tang & Wang 2024, "Fluctuation-based adaptive structured pruning for large
language models"): structured pruning of a language model's heads and MLP channels, no training.

A unit is judged by the input features of the layer that reads it (o_proj for a head, down_proj
for an MLP channel): if a feature hardly fluctuates over the calibration tokens, its contribution
W_:,j·x_j is nearly the constant W_:,j·x̄_j, which a bias can carry after the unit is removed.
Per feature j: wifv = Var_tokens(x_j) · ‖W_:,j‖² (the paper's choice; Var the sample variance
over every calibration token), ifv = Var(x_j), wifn = mean_i |W_ij| · ‖x_j‖₂. A unit's score is
the sum over its features. Compensation: the reader's output bias gains W[:, removed] · x̄[removed].
With granularity.allocation=global the scores are standardised per block and module and ranked
together, weighed by their parameters (the paper's adaptive structure, lm/structured.py).

(The authors' code squares the attention scores once more and averages standardised per-feature
scores over a head; here a head's score is its features' sum, standardised as a unit.)
"""

from typing import Optional

import torch
from torch import Tensor

from ..config.options import FlapConfig
from ..core.layerwise import Fluctuation
from . import Criterion, UnitWeights, register


@register("flap")
class Flap(Criterion):
    cfg: FlapConfig
    granularities = ("width", "heads", "mlp")
    calibrates = True

    def score(self, ctx):
        raise NotImplementedError("criterion=flap scores the structures of language models (lm/structured.py)")

    def unit_stat(self) -> Fluctuation:
        return Fluctuation()

    def feature_scores(self, unit: UnitWeights, stat: Fluctuation) -> Tensor:
        weight = unit.reader.weight.detach().double()
        if self.cfg.metric == "ifv":
            return stat.variance
        if self.cfg.metric == "wifv":
            return stat.variance * weight.pow(2).sum(0)
        root_mean_square = (stat.m2 + stat.count * stat.mean.pow(2)).sqrt()  # ‖x_j‖₂ over the tokens
        return (weight.abs() * root_mean_square).mean(0)

    def output_bias(self, unit: UnitWeights, stat: Fluctuation, removed: Tensor) -> Optional[Tensor]:
        if not self.cfg.compensate or not bool(removed.any()):
            return None
        weight, removed = unit.reader.weight.detach(), removed.to(unit.reader.weight.device)
        mean = stat.mean.to(device=weight.device, dtype=torch.float64)
        return (weight[:, removed].double() @ mean[removed]).to(weight.dtype)
