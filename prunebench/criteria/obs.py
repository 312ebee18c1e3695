"""Optimal Brain Surgeon (Hassibi & Stork 1993), block-diagonal as in WoodFisher (Singh & Alistarh 2020).

The Hessian is the empirical Fisher with damping, H = αI + (1/n) Σ g gᵀ over `samples`
per-example gradients, and its inverse is built by the recursive Woodbury update, never by
inverting H. To scale, H⁻¹ is block-diagonal: each layer's flattened weights are cut into
blocks of `block_size` (cost O(n·N·B), memory O(N·B) for N weights).

Saliency of removing weight q alone: ΔL_q = θ_q² / (2 [H⁻¹]_qq). Removing a set Q of a block
at once uses the joint OBS solution of min ½δᵀHδ subject to θ_Q + δ_Q = 0:
    δ = −H⁻¹ E_Q ([H⁻¹]_QQ)⁻¹ θ_Q,    predicted ΔL = ½ θ_Qᵀ ([H⁻¹]_QQ)⁻¹ θ_Q,
with Q all the block's pruned weights (earlier ones included, so they stay exactly zero).
"""

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.curvature import per_example_gradients, woodbury_update
from ..core.masks import Masks
from ..config.options import OBSConfig
from . import Criterion, ScoreContext, register
from .obd import take_examples


def blocks_of(flat: Tensor, size: int) -> List[Tensor]:
    """A layer's flattened values as [full blocks (m, size), the rest (1, r)] (views)."""
    full = flat.shape[-1] // size * size
    parts = [flat[..., :full].reshape(flat.shape[:-1] + (-1, size))]
    if full < flat.shape[-1]:
        parts.append(flat[..., full:].unsqueeze(-2))
    return parts


def inverse_fisher_blocks(model, names: List[str], data, cfg: OBSConfig) -> Dict[str, List[Tensor]]:
    """Per layer, the blocks of (αI + F)⁻¹: a list of (blocks, B, B) tensors, in layer order."""
    params = dict(model.named_parameters())
    n = sum(int(y.shape[0]) for _, y in data)
    h_inv = {}
    for name in names:
        numel = params[name].numel()
        sizes = [b.shape[-1] for b in blocks_of(torch.empty(numel), cfg.block_size)]
        counts = [numel // cfg.block_size] + ([1] if len(sizes) > 1 else [])
        h_inv[name] = [torch.eye(s, dtype=torch.float64, device=params[name].device).expand(c, s, s) / cfg.alpha
                       for s, c in zip(sizes, counts)]
    for x, y in data:
        for start in range(0, y.shape[0], cfg.chunk):
            grads = per_example_gradients(model, names, x[start:start + cfg.chunk], y[start:start + cfg.chunk])
            for name in names:
                g = grads[name].reshape(grads[name].shape[0], -1).double()  # k, numel
                parts = blocks_of(g, cfg.block_size)  # (k, m, B) ...
                h_inv[name] = [woodbury_update(h, part.transpose(0, 1), n)
                               for h, part in zip(h_inv[name], parts)]
    return h_inv


def block_diagonal(h_inv_blocks: List[Tensor]) -> Tensor:
    """The diagonals of a layer's blocks, flattened in weight order."""
    return torch.cat([h.diagonal(dim1=1, dim2=2).reshape(-1) for h in h_inv_blocks])


@register("obs")
class OBS(Criterion):
    # the OBS update compensates single weights (kron_obs is the structured form)
    granularities = ("unstructured", "nm")

    def __init__(self, cfg: OBSConfig):
        super().__init__(cfg)
        self.h_inv: Optional[Dict[str, List[Tensor]]] = None
        self.data = None

    def memory_need(self, model, masks: Masks, num_classes: int) -> Optional[Tuple[int, str]]:
        """H⁻¹'s blocks (|θ|·B float64), a layer's new blocks beside its old ones during a
        Woodbury update, and a chunk of per-example gradients with the update's temporaries."""
        params = dict(model.named_parameters())
        sizes = [params[n].numel() for n in masks]
        b, k = self.cfg.block_size, self.cfg.chunk
        need = (sum(sizes) + max(sizes)) * b * 8 + sum(sizes) * k * (4 + 8 + 8)
        return need, (f"the block-diagonal inverse Fisher ({sum(sizes):,} weights × block_size {b} × 8 bytes) "
                      f"and its Woodbury updates")

    def score(self, ctx: ScoreContext) -> Dict[str, Tensor]:
        self.data = take_examples(ctx.batches, self.cfg.samples)
        self.h_inv = inverse_fisher_blocks(ctx.model, ctx.masks.names(), self.data, self.cfg)
        out = {}
        for name, w in ctx.params().items():
            diag = block_diagonal(self.h_inv[name]).to(w.dtype)
            out[name] = (w.detach().reshape(-1).pow(2) / (2 * diag)).reshape(w.shape)
        return out

    @torch.no_grad()
    def compensate(self, model, masks: Masks, ctx: ScoreContext) -> Dict:
        loss_before = self._loss(model)
        params = dict(model.named_parameters())
        predicted = 0.0
        for name in masks.names():
            w = params[name]
            theta = w.detach().reshape(-1).double()
            pruned = masks[name].reshape(-1) == 0
            new_parts = []
            for h, t, q in zip(self.h_inv[name], blocks_of(theta, self.cfg.block_size),
                               blocks_of(pruned, self.cfg.block_size)):
                delta, dl = joint_obs_update(h, t, q)
                new_parts.append((t + delta).reshape(-1))
                predicted += dl
            w.copy_(torch.cat(new_parts).reshape(w.shape).to(w.dtype))
        masks.apply(model)
        measured = self._loss(model) - loss_before
        self.h_inv, self.data = None, None  # free the blocks
        return {"obs_predicted_loss_increase": predicted, "obs_measured_loss_increase": measured}

    def _loss(self, model) -> float:
        was_training = model.training
        model.eval()
        try:
            total = sum(float(F.cross_entropy(model(x), y, reduction="sum")) for x, y in self.data)
        finally:
            model.train(was_training)
        return total / sum(int(y.shape[0]) for _, y in self.data)


def joint_obs_update(h_inv: Tensor, theta: Tensor, pruned: Tensor):
    """For blocks (m, B, B), weights (m, B) and pruned flags (m, B): the OBS weight change that
    zeroes every pruned weight of each block at the least quadratic cost, and the total cost.

    δθ = −[H⁻¹]_{:,Q} ([H⁻¹]_QQ)⁻¹ θ_Q, cost ½ θ_Qᵀ ([H⁻¹]_QQ)⁻¹ θ_Q; the blocks that lose the same
    number of weights are solved together, as one batch."""
    deltas = torch.zeros_like(theta)
    counts = pruned.sum(1)
    predicted = 0.0
    for k in counts.unique().tolist():
        if k == 0:
            continue
        rows = (counts == k).nonzero().squeeze(1)
        # the pruned positions of each block, in order (a stable sort puts them first)
        q = torch.argsort((~pruned[rows]).to(torch.uint8), dim=1, stable=True)[:, :k]
        h = h_inv[rows]  # (n, B, B)
        h_cols = torch.gather(h, 2, q.unsqueeze(1).expand(-1, h.shape[1], -1))  # [H⁻¹]_{:,Q}: (n, B, k)
        h_qq = torch.gather(h_cols, 1, q.unsqueeze(2).expand(-1, -1, k))  # (n, k, k)
        theta_q = torch.gather(theta[rows], 1, q)
        lam = torch.linalg.solve(h_qq, theta_q)  # ([H⁻¹]_QQ)⁻¹ θ_Q
        deltas[rows] = -(h_cols @ lam.unsqueeze(2)).squeeze(2)
        predicted += 0.5 * float((theta_q * lam).sum())
    return deltas, predicted
