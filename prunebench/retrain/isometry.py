"""Approximate isometry (Lee et al. 2020, signal propagation): after pruning, each layer's surviving
weights move by SGD towards (M⊙W)ᵀ(M⊙W) = I, from their current values."""

from typing import Dict

import torch
from torch import Tensor, nn

from ..core.masks import PRUNABLE_TYPES, Masks
from . import register


def layer_matrix(w: Tensor) -> Tensor:
    """A Conv/Linear weight as the matrix of its linear map: out × (in · kernel)."""
    return w.reshape(w.shape[0], -1)


def gram_gap(m: Tensor) -> Tensor:
    """‖MᵀM − I‖²_F on the smaller side, so that 'all singular values are 1' is reachable."""
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    return (gram - torch.eye(gram.shape[0], dtype=m.dtype, device=m.device)).pow(2).sum()


def singular_value_stats(m: Tensor) -> Dict[str, float]:
    sv = torch.linalg.svdvals(m.double())
    return {"mean": float(sv.mean()), "std": float(sv.std()) if sv.numel() > 1 else 0.0,
            "min": float(sv.min()), "max": float(sv.max())}


@register("isometry")
def isometry(model: nn.Module, masks: Masks, cfg, *, init_state, rewind_state, fresh_model) -> Dict:
    """Lee et al. 2020: each layer's surviving weights move by SGD towards (M⊙W)ᵀ(M⊙W) = I.

    Returns, per layer, the singular values of M⊙W (the layer's Jacobian when the activation
    is linear) before and after, and the isometry gap ‖·‖²_F before and after.
    """
    modules = dict(model.named_modules())
    report = {}
    for name, mask in masks.items():
        module_name, _, param = name.rpartition(".")
        if param != "weight" or not isinstance(modules[module_name], PRUNABLE_TYPES):
            continue
        weight = dict(model.named_parameters())[name]
        m = layer_matrix(mask).to(weight.dtype)
        w = (layer_matrix(weight.detach()) * m).clone().requires_grad_(True)
        before_gap, before_sv = float(gram_gap(w.detach())), singular_value_stats(w.detach())
        opt = torch.optim.SGD([w], lr=cfg.lr)
        for _ in range(cfg.steps):
            loss = gram_gap(w * m)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        w = (w.detach() * m)
        after_gap = float(gram_gap(w))
        if not torch.isfinite(torch.tensor(after_gap)) or after_gap > before_gap:
            raise FloatingPointError(
                f"isometry diverged on {name} (gap {before_gap:.4g} -> {after_gap:.4g}); "
                f"lower retrain.lr (now {cfg.lr})")
        with torch.no_grad():
            weight.copy_(w.reshape(weight.shape))
        report[name] = {"gap_before": before_gap, "gap_after": after_gap,
                        "singular_values_before": before_sv, "singular_values_after": singular_value_stats(w)}
    return report
