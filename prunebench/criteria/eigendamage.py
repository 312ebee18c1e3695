"""EigenDamage (Wang et al. 2019): structured pruning in the Kronecker-factored eigenbasis.

With K-FAC factors A = Q_A Λ_A Q_Aᵀ and S = Q_S Λ_S Q_Sᵀ of a layer, W = Q_S W′ Q_Aᵀ, and in
that basis the Fisher S ⊗ A is diagonal: Λ_S ⊗ Λ_A. So each layer becomes three,
    in_basis (Q_Aᵀ, a conv with the layer's kernel/stride, or a Linear) → core (W′, 1×1) →
    out_basis (Q_S, 1×1, with the layer's bias),
which compute the same function (a test checks it). Removing core entry (i, j) costs
½ W′_ij² λ_S,i λ_A,j; an input direction j (a unit of in_basis) costs the sum over its column,
an output direction i (a unit of core) the sum over its row. The cheapest `sparsity` fraction
of all directions goes (ranked globally by default; "ratio" counts directions, as in the
paper), taking the matching rows/columns of W′ and eigenvectors of Q_A/Q_S with them; the
smaller network is then fine-tuned as a whole.

Conventions: the bias stays out of A (it is not rotated; out_basis carries it); eigenvalues
below 0 from round-off count as 0; the classifier keeps all its output directions, so the
network keeps its outputs. One round only: a second would need factors of the new layers.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..config import CriterionConfig, check, check_choice
from ..curvature import KroneckerFactors
from ..granularity import Granularity, only
from ..masks import Masks
from . import Criterion, ScoreContext, register
from .kron import factors_of


@dataclass
class EigenDamageConfig(CriterionConfig):
    samples: int = 1024  # training examples the K-FAC factors are averaged over
    fisher: str = "true"  # true: labels sampled from the model (as the paper) | empirical

    def __post_init__(self):
        super().__post_init__()
        check(self.samples >= 1, f"criterion.samples must be >= 1, got {self.samples}")
        check_choice("criterion.fisher", self.fisher, ("true", "empirical"))


class Eigenbasis(nn.Sequential):
    """A Conv2d/Linear layer as in_basis (Q_Aᵀ) → core (W′) → out_basis (Q_S)."""


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


@register("eigendamage", EigenDamageConfig)
class EigenDamage(Criterion):
    granularities = ("filter",)  # its units are eigen-directions: rows/columns of W′
    changes_architecture = True

    def reparameterize(self, ctx: ScoreContext) -> Optional[nn.Module]:
        factors = factors_of(self.cfg, ctx)
        model = copy.deepcopy(ctx.model)
        self.eigenvalues: Dict[str, Tuple[Tensor, Tensor]] = {}
        for weight, f in factors.items():
            name = weight.rpartition(".")[0]
            layer, lam_a, lam_s = eigenbasis_layer(model.get_submodule(name), f)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
            self.eigenvalues[name] = (lam_a, lam_s)
        self.classifier = list(self.eigenvalues)[-1]  # keeps its output directions, so the outputs
        return model

    def score(self, ctx: ScoreContext) -> Dict[str, Tensor]:
        out = {}
        for name, (lam_a, lam_s) in self.eigenvalues.items():
            core = ctx.model.get_submodule(f"{name}.core").weight.detach().double()
            core = core.reshape(core.shape[0], core.shape[1])
            damage = 0.5 * core.pow(2) * torch.outer(lam_s, lam_a)
            out[f"{name}.in_basis.weight"] = damage.sum(0)  # input directions: columns of W′
            if name != self.classifier:
                out[f"{name}.core.weight"] = damage.sum(1)  # output directions: rows of W′
        return out

    def select(self, scores: Dict[str, Tensor], ctx: ScoreContext, target: float,
               granularity: Granularity) -> Masks:
        # only the eigen-directions are units here, and `target` is a fraction of them
        return self.rank(scores, ctx.masks, target, only(granularity, list(scores)))
