"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: massive language models can be accurately
pruned in one-shot"): per layer, choose the mask and reconstruct the surviving weights so that
the layer's outputs on calibration data change least, ‖WX − ŴX‖².

Each output row is an OBS problem with the same Hessian H = 2XXᵀ/N (+ λI, λ = damp · mean diag H),
so one factor serves every row: U, the upper Cholesky factor of H⁻¹. Columns are eliminated left
to right; removing column i's pruned weights moves the columns after it by the OBS update
−(w_i / U_ii) · U_i,i: (row i of U is the i-th column's inverse Hessian after the previous
columns are fixed). Columns go in blocks of `block_size`: the updates inside a block are
applied at once to the rest (lazy batch updates), and the mask of a block is chosen when the
block starts, by the OBS saliency w² / U_ii² (N:M: every M columns, the M−N lowest of each row).
Layers go in forward order, each calibrated on the inputs the pruned layers before it produce.
"""

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..core.device import exact_fp32
from ..core.granularity import Granularity
from ..core.layerwise import Gram
from ..core.masks import Masks
from ..config.options import SparseGPTConfig
from . import LayerwiseCriterion, ScoreContext, register

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@register("sparsegpt")
class SparseGPT(LayerwiseCriterion):
    needs_trained = True  # reconstructs a trained layer's outputs
    reconstructs = True
    cfg: SparseGPTConfig

    def memory_need(self, model, masks: Masks, num_classes: int) -> Optional[Tuple[int, str]]:
        """The widest layer's H, its Cholesky factors and the layer's working copies."""
        params = dict(model.named_parameters())
        cols = max(params[n][0].numel() for n in masks)
        rows = max(params[n].shape[0] for n in masks)
        size = DTYPES[self.cfg.precision].itemsize
        return (3 * cols * cols + 4 * rows * cols) * size, f"SparseGPT's Hessian and factors ({cols} columns)"

    def score(self, ctx: ScoreContext) -> Dict[str, Tensor]:
        raise NotImplementedError("criterion=sparsegpt chooses its masks while it reconstructs the weights: "
                                  "it has no scores apart from its pruning")

    def layer_stat(self, name: str) -> Gram:
        return Gram(DTYPES[self.cfg.precision])

    def prune_layer(self, weight: nn.Parameter, stat: Gram, mask: Tensor, fraction: float,
                    granularity: Granularity) -> Tensor:
        """Prunes and reconstructs the layer in place; returns its new mask."""
        rows = weight.detach().reshape(weight.shape[0], -1)
        nm = (granularity.m, granularity.pruned_per_block(fraction)) if granularity.local else None
        with exact_fp32():  # the OBS updates in full fp32, not TF32 (as the authors' code)
            w_hat, keep = sparsegpt_layer(rows, stat.hessian(), fraction, mask.reshape(rows.shape) != 0,
                                          self.cfg.block_size, self.cfg.damp, nm=nm)
        with torch.no_grad():
            weight.copy_(w_hat.reshape(weight.shape).to(weight.dtype))
        return keep.reshape(weight.shape).to(mask.dtype)


def upper_inverse_factor(h: Tensor, damp: float) -> Tensor:
    """U with UᵀU = (H + λI)⁻¹, λ = damp · mean diag H (H is changed: damped in place)."""
    h.diagonal().add_(damp * h.diagonal().mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def sparsegpt_layer(w: Tensor, h: Tensor, fraction: float, alive: Tensor, block_size: int = 128,
                    damp: float = 0.01, nm: Optional[Tuple[int, int]] = None) -> Tuple[Tensor, Tensor]:
    """One layer: weights (rows, cols), Hessian (cols, cols) → reconstructed weights and the
    kept mask (bool). Unstructured: round(fraction · rows · width) of each column block go;
    nm=(M, pruned): `pruned` of every M columns of each row. A weight not `alive` stays pruned.

    Features that no calibration token uses (diag H = 0) cannot change the outputs: their
    weights are set to 0 and their Hessian entry to 1, as in the authors' code."""
    w = w.detach().clone().to(h.dtype)
    h = h.clone()
    unused = h.diagonal() == 0
    h[unused, unused] = 1
    w[:, unused] = 0
    u = upper_inverse_factor(h, damp)
    pruned = torch.zeros_like(alive)
    for start in range(0, w.shape[1], block_size):
        end = min(start + block_size, w.shape[1])
        block, u_block = w[:, start:end].clone(), u[start:end, start:end]
        dead = ~alive[:, start:end]
        mask = block_mask(block, u_block.diagonal(), fraction, dead) if nm is None else dead.clone()
        errors = torch.zeros_like(block)
        for i in range(end - start):
            if nm is not None and i % nm[0] == 0:
                mask[:, i:i + nm[0]] |= nm_mask(block[:, i:i + nm[0]], u_block.diagonal()[i:i + nm[0]], nm[1],
                                                dead[:, i:i + nm[0]])
            col, d = block[:, i], u_block[i, i]
            removed = torch.where(mask[:, i], col, 0)  # what the pruned weights of this column were
            errors[:, i] = removed / d
            block[:, i:] -= errors[:, i:i + 1] * u_block[i, i:].unsqueeze(0)  # OBS: compensate the rest
        block[mask] = 0
        w[:, start:end] = block
        w[:, end:] -= errors @ u[start:end, end:]  # the block's updates to the columns after it, at once
        pruned[:, start:end] = mask
    return w, ~pruned


def block_mask(block: Tensor, d: Tensor, fraction: float, dead: Tensor) -> Tensor:
    """The round(fraction · size) lowest saliencies w² / d² of a column block (ties: first in
    row-major position), and every dead weight."""
    saliency = (block.pow(2) / d.pow(2).unsqueeze(0)).masked_fill(dead, -float("inf")).reshape(-1)
    k = max(int(round(fraction * saliency.numel())), int(dead.sum()))
    mask = torch.zeros_like(saliency, dtype=torch.bool)
    mask[torch.argsort(saliency, stable=True)[:k]] = True
    return mask.reshape(block.shape)


def nm_mask(group: Tensor, d: Tensor, pruned: int, dead: Tensor) -> Tensor:
    """In each row of M columns, the `pruned` lowest saliencies (ties: first), and the dead."""
    saliency = (group.pow(2) / d.pow(2).unsqueeze(0)).masked_fill(dead, -float("inf"))
    mask = dead.clone()
    if pruned:
        mask.scatter_(1, torch.argsort(saliency, dim=1, stable=True)[:, :pruned], True)
    return mask
