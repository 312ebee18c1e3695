"""REAP, Router-weighted Expert Activation Pruning (Lasby et al. 2025, "REAP the experts: why
pruning prevails for one-shot MoE compression"): the saliency of expert j is

    S_j = (1 / |X_j|) · Σ_{x ∈ X_j} g_j(x) · ‖f_j(x)‖₂

over X_j, the calibration tokens the router sends to j; g_j(x) is the router's gate score of j (its
softmax probability; a DeepSeek-V3-style router's sigmoid affinity: moe.gate_scores), with
criterion.gate=renormalized divided by the sum over the token's chosen experts (the authors' option;
for DeepSeek-V3 the weight the model gives j, but for its constant routed_scaling_factor); f_j(x)
is the expert's output before it is weighed. An expert no token reaches scores 0 (the authors' code
leaves its sum at zero). The lowest saliencies go (granularity=experts).

Where the authors' code differs, on sigmoid routers (GLM-4.5): it takes a softmax over the logits
and the top-k of the raw logits; here X_j and g_j are the model's own routing (groups and
correction bias included) and gate.
"""

from typing import Optional

import torch
from torch import Tensor

from ..config.options import ReapConfig
from . import Criterion, Routed, register


class Saliency:
    def __init__(self, experts: int, renormalized: bool):
        self.sums = torch.zeros(experts, dtype=torch.float64)
        self.tokens = torch.zeros(experts, dtype=torch.float64)
        self.renormalized = renormalized

    def __call__(self, routed: Routed) -> None:
        probs = routed.scores
        if self.renormalized:
            probs = probs / probs.gather(1, routed.index).sum(dim=-1, keepdim=True)
        chosen = torch.stack([(routed.index == e).any(dim=-1) for e in range(routed.experts)])  # (E, T)
        counts = chosen.sum(dim=1).cpu()  # one sync per batch: which experts to run
        for expert in counts.nonzero().flatten().tolist():
            rows = chosen[expert]
            norms = routed.output(routed.tokens[rows], expert).float().norm(dim=-1)
            self.sums[expert] += (probs[rows, expert] * norms).double().sum().cpu()
        self.tokens += counts.double()

    def saliency(self) -> Tensor:
        return torch.where(self.tokens > 0, self.sums / self.tokens.clamp(min=1), torch.zeros_like(self.sums))


@register("reap")
class Reap(Criterion):
    cfg: ReapConfig
    granularities = ("experts",)
    calibrates = True
    layer_targets = False

    def expert_stat(self, experts: int) -> Saliency:
        return Saliency(experts, self.cfg.gate == "renormalized")

    def expert_scores(self, stat: Saliency, experts: int, generator: Optional[torch.Generator]) -> Tensor:
        return stat.saliency()
