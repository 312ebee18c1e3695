"""EigenDamage (Wang et al. 2019): structured pruning in the Kronecker-factored eigenbasis.

With K-FAC factors A = Q_A Λ_A Q_Aᵀ and S = Q_S Λ_S Q_Sᵀ of a layer, W = Q_S W′ Q_Aᵀ, and in
that basis the Fisher S ⊗ A is diagonal: Λ_S ⊗ Λ_A. So each layer becomes three,
    in_basis (Q_Aᵀ, a conv with the layer's kernel/stride, or a Linear) → core (W′, 1×1) →
    out_basis (Q_S, 1×1, with the layer's bias),
which compute the same function (a test checks it). Removing core entry (i, j) costs
½ W′_ij² λ_S,i λ_A,j; an input direction j (a unit of in_basis) costs the sum over its column,
an output direction i (a unit of core) the sum over its row. The cheapest `sparsity` fraction
of all directions goes (one threshold for all layers; "ratio" counts directions, as in the
paper), taking the matching rows/columns of W′ and eigenvectors of Q_A/Q_S with them; the
smaller network is then fine-tuned as a whole.

Conventions: the bias stays out of A (it is not rotated; out_basis carries it); eigenvalues
below 0 from round-off count as 0; the classifier is left as it is (the authors' code does so),
and so is any layer whose bottleneck would not be smaller than itself. One round only: a second
would need factors of the new layers.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..core.curvature import KroneckerFactors
from ..core.granularity import Granularity, only
from ..core.masks import Masks
from ..core.select import SelectOptions, select_by_threshold
from . import Criterion, ScoreContext, register
from .kron import factors_of, kfac_memory

log = logging.getLogger("prunebench")


class Eigenbasis(nn.Sequential):
    """A Conv2d/Linear layer as in_basis (Q_Aᵀ) → core (W′) → out_basis (Q_S)."""
    MACS_IN_LAYERS = True  # metrics.count_macs: its own forward multiplies nothing


def eigenbasis_layer(module: nn.Module, f: KroneckerFactors) -> Tuple[Eigenbasis, Tensor, Tensor]:
    """The layer in its K-FAC eigenbasis, with the eigenvalues (λ_A, λ_S) of its directions."""
    d_in = f.A.shape[0] - int(f.has_bias)
    lam_a, q_a = torch.linalg.eigh(f.A[:d_in, :d_in])
    lam_s, q_s = torch.linalg.eigh(f.S)
    w = module.weight.detach().double().reshape(module.weight.shape[0], -1)
    core = q_s.T @ w @ q_a
    out, d_a, d_s = w.shape[0], q_a.shape[1], q_s.shape[1]
    if isinstance(module, nn.Conv2d):
        in_basis = nn.Conv2d(module.in_channels, d_a, module.kernel_size, module.stride, module.padding,
                             module.dilation, bias=False)
        core_layer = nn.Conv2d(d_a, d_s, 1, bias=False)
        out_basis = nn.Conv2d(d_s, out, 1, bias=module.bias is not None)
    else:
        in_basis = nn.Linear(module.in_features, d_a, bias=False)
        core_layer = nn.Linear(d_a, d_s, bias=False)
        out_basis = nn.Linear(d_s, out, bias=module.bias is not None)
    layer = Eigenbasis(OrderedDict(in_basis=in_basis, core=core_layer, out_basis=out_basis))
    layer.to(device=module.weight.device, dtype=module.weight.dtype)
    with torch.no_grad():
        for target, value in zip((in_basis, core_layer, out_basis), (q_a.T, core, q_s)):
            target.weight.copy_(value.reshape(target.weight.shape))
        if module.bias is not None:
            out_basis.bias.copy_(module.bias)
    return layer, lam_a.clamp(min=0), lam_s.clamp(min=0)


def bottleneck_params(module: nn.Module, kept_a: int, kept_s: int) -> int:
    """Parameters of the layer as in_basis (kept_a) → core → out_basis (kept_s)."""
    per_direction = module.weight[0].numel()  # C_in·kh·kw (or in_features) weights per in_basis unit
    bias = module.bias.numel() if module.bias is not None else 0
    return kept_a * per_direction + kept_s * kept_a + module.weight.shape[0] * kept_s + bias


@register("eigendamage")
class EigenDamage(Criterion):
    """As the authors' code does: every Conv/Linear layer but the classifier is considered; one
    threshold on the direction scores of all of them removes `sparsity` of all directions (each
    side of a layer keeps `min_density` of its directions at least); a layer whose bottleneck
    would have more parameters than the layer itself is left as it is, unpruned."""

    granularities = ("filter",)  # its units are eigen-directions: rows/columns of W′
    needs_trained = True  # OBD in the eigenbasis: a Taylor expansion around a trained minimum
    changes_architecture = True

    def validate(self, model: nn.Module, masks: Masks) -> None:
        if self.cfg.scope != "global":
            raise ConfigError(f"criterion=eigendamage ranks all directions by one threshold; "
                              f"criterion.scope={self.cfg.scope} does not apply (use global)")

    def memory_need(self, model: nn.Module, masks: Masks, num_classes: int) -> Optional[Tuple[int, str]]:
        return kfac_memory(model, masks)

    def reparameterize(self, ctx: ScoreContext, target: Optional[float] = None) -> Optional[nn.Module]:
        factors = factors_of(self.cfg, ctx)
        names = list(factors)
        excluded = {names[-1]}  # the classifier stays as it is
        excluded |= {f"{m}.weight" for m in self.cfg.exclude} | ({names[0]} if self.cfg.exclude_first else set())
        factors = {n: f for n, f in factors.items() if n not in excluded}
        layers, damages = {}, {}
        for weight, f in factors.items():
            name = weight.rpartition(".")[0]
            layers[name] = eigenbasis_layer(ctx.model.get_submodule(name), f)
            core = layers[name][0].core.weight.detach().double()
            lam_a, lam_s = layers[name][1:]
            damage = 0.5 * core.reshape(core.shape[0], core.shape[1]).pow(2) * torch.outer(lam_s, lam_a)
            damages[name] = (damage.sum(0), damage.sum(1))  # input directions (columns), output (rows)
        everything = torch.cat([d for pair in damages.values() for d in pair])
        # keep the directions above the score at position target·N of the sorted scores
        threshold = float(torch.sort(everything).values[min(int((target or 0.0) * everything.numel()),
                                                               everything.numel() - 1)])
        self.threshold = math.nextafter(threshold, math.inf)
        model = copy.deepcopy(ctx.model)
        self.scores: Dict[str, Tensor] = {}
        for name, (in_scores, out_scores) in damages.items():
            original = ctx.model.get_submodule(name)
            kept_a, kept_s = (max(int((s > threshold).sum()), self._reserve(s.numel()))
                              for s in (in_scores, out_scores))
            if bottleneck_params(original, kept_a, kept_s) > sum(p.numel() for p in original.parameters()):
                continue  # no smaller than the layer itself: leave it
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layers[name][0])
            self.scores[f"{name}.in_basis.weight"] = in_scores
            self.scores[f"{name}.core.weight"] = out_scores
        if not self.scores:
            log.warning("eigendamage: no layer's bottleneck would be smaller than the layer; nothing is pruned")
        return model

    def _reserve(self, n: int) -> int:
        return max(1, math.ceil(self.cfg.min_density * n - 1e-9))

    def score(self, ctx: ScoreContext) -> Dict[str, Tensor]:
        return self.scores

    def select(self, scores: Dict[str, Tensor], ctx: ScoreContext, target: float,
               granularity: Granularity) -> Masks:
        # only the eigen-directions are units here, and one threshold decides for all of them
        thresholds = {n: self.threshold for n in scores}
        if self.cfg.sanity == "invert":
            scores, thresholds = {n: -s for n, s in scores.items()}, {n: -self.threshold for n in scores}
        return select_by_threshold(scores, ctx.masks, thresholds, SelectOptions.of(self.cfg),
                                   only(granularity, list(scores)))
