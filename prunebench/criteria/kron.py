"""Kron-OBD and Kron-OBS (Wang et al. 2019, "EigenDamage", Sec. 3): OBD and OBS for whole
filters, with each layer's Hessian approximated by its K-FAC Fisher, S ⊗ A for the row-major
weight matrix W = [weight.reshape(out, -1) | bias] (see curvature.kfac_factors).

Removing filter j (row F_j of W) costs, under that quadratic model,
- kron_obd: ΔL_j = ½ S_jj F_jᵀ A F_j (the other rows held fixed), and
- kron_obs: ΔL_j = ½ F_jᵀ A F_j / [S⁻¹]_jj with the other rows moving by the OBS update
  ΔW = −S⁻¹ e_j F_jᵀ / [S⁻¹]_jj. For the set P of rows a round removes together, the same
  constrained minimum is ΔW = −S⁻¹_{:,P} (S⁻¹_{PP})⁻¹ W_P: A cancels, so only S is inverted.
Both score filters directly (one value per output channel), so they need granularity=filter.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..core import curvature
from ..core.masks import Masks
from ..config.options import KronConfig
from . import Criterion, ScoreContext, register
from .obd import take_examples


def layer_matrix(module: nn.Module) -> Tensor:
    """W = [weight.reshape(out, -1) | bias] in float64, the matrix the factors describe."""
    w = module.weight.detach().reshape(module.weight.shape[0], -1).double()
    return torch.cat([w, module.bias.detach().double()[:, None]], 1) if module.bias is not None else w


def factors_of(cfg: KronConfig, ctx: ScoreContext) -> Dict[str, curvature.KroneckerFactors]:
    """K-FAC factors of every masked Conv2d/Linear weight, keyed by its mask name."""
    modules = dict(ctx.model.named_modules())
    layers = [n.rpartition(".")[0] for n in ctx.masks
              if n.endswith(".weight") and isinstance(modules[n.rpartition(".")[0]], (nn.Conv2d, nn.Linear))]
    data = take_examples(ctx.batches, cfg.samples)
    factors = curvature.kfac_factors(ctx.model, layers, data, fisher=cfg.fisher, generator=ctx.generator)
    return {f"{n}.weight": f for n, f in factors.items()}


def kfac_memory(model: nn.Module, masks: Masks) -> Tuple[int, str]:
    """Every layer's A and S in float64, and an inverse or eigendecomposition of the largest
    (about three more of its matrices)."""
    sizes = []
    for name in masks:
        module = model.get_submodule(name.rpartition(".")[0])
        if name.endswith(".weight") and isinstance(module, (nn.Conv2d, nn.Linear)):
            d_in = module.weight[0].numel() + (module.bias is not None)
            sizes += [d_in ** 2 * 8, module.weight.shape[0] ** 2 * 8]
    return sum(sizes) + 3 * max(sizes, default=0), "the K-FAC factors A and S of every layer (float64)"


def damped_inverse(S: Tensor, damping: float) -> Tensor:
    eye = torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
    return torch.linalg.inv(S + damping * S.diagonal().mean() * eye)


def row_quadratic(W: Tensor, A: Tensor) -> Tensor:
    """F_jᵀ A F_j for every row j of W."""
    return ((W @ A) * W).sum(1)


def obs_update(W: Tensor, S_inv: Tensor, removed: Tensor) -> Tensor:
    """The change of W that zeroes rows `removed` (bool per row) at least cost under S ⊗ A."""
    P = removed.nonzero().squeeze(1)
    return -S_inv[:, P] @ torch.linalg.solve(S_inv[P][:, P], W[P])


@register("kron_obd")
class KronOBD(Criterion):
    needs_trained = True  # a Taylor expansion around a trained minimum
    granularities = ("filter",)

    def memory_need(self, model: nn.Module, masks: Masks, num_classes: int) -> Optional[Tuple[int, str]]:
        return kfac_memory(model, masks)

    def score(self, ctx: ScoreContext) -> Dict[str, Tensor]:
        modules = dict(ctx.model.named_modules())
        out = {}
        for name, f in factors_of(self.cfg, ctx).items():
            W = layer_matrix(modules[name.rpartition(".")[0]])
            out[name] = 0.5 * f.S.diagonal() * row_quadratic(W, f.A)
        return out


@register("kron_obs")
class KronOBS(Criterion):
    needs_trained = True  # a Taylor expansion around a trained minimum
    granularities = ("filter",)

    def memory_need(self, model: nn.Module, masks: Masks, num_classes: int) -> Optional[Tuple[int, str]]:
        return kfac_memory(model, masks)

    def score(self, ctx: ScoreContext) -> Dict[str, Tensor]:
        modules = dict(ctx.model.named_modules())
        self.factors = factors_of(self.cfg, ctx)  # kept for the update in `compensate`
        out = {}
        for name, f in self.factors.items():
            W = layer_matrix(modules[name.rpartition(".")[0]])
            S_inv = damped_inverse(f.S, self.cfg.damping)
            out[name] = 0.5 * row_quadratic(W, f.A) / S_inv.diagonal()
        return out

    @torch.no_grad()
    def compensate(self, model: nn.Module, masks: Masks, ctx: ScoreContext) -> Optional[Dict]:
        """Move each layer's surviving filters by the joint OBS update for all its removed ones."""
        modules = dict(model.named_modules())
        predicted = 0.0
        for name, f in self.factors.items():
            removed = ~masks[name].reshape(masks[name].shape[0], -1).any(1)
            if not bool(removed.any()):
                continue
            module = modules[name.rpartition(".")[0]]
            W = layer_matrix(module)
            S_inv = damped_inverse(f.S, self.cfg.damping)
            delta = obs_update(W, S_inv, removed.to(W.device))
            P = removed.nonzero().squeeze(1).to(W.device)
            # ½ tr(W_Pᵀ (S⁻¹_PP)⁻¹ W_P A): the loss increase the quadratic model predicts
            predicted += 0.5 * float((torch.linalg.solve(S_inv[P][:, P], W[P]) * (W[P] @ f.A)).sum())
            new = W + delta
            if module.bias is not None:
                module.bias.copy_(new[:, -1].to(module.bias.dtype))
                new = new[:, :-1]
            module.weight.copy_(new.reshape(module.weight.shape).to(module.weight.dtype))
        self.factors = {}
        return {"obs_predicted_loss_increase": predicted}
