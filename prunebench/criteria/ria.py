"""RIA, Relative Importance and Activations (Zhang, Bai, Lin, Zhao, Hou & Cannistraci, ICLR 2024,
"Plug-and-Play: An Efficient Post-training Pruning Method for Large Language Models").

Score S_ij = (|W_ij| / Σ_j |W_ij| + |W_ij| / Σ_i |W_ij|) · ‖X_j‖₂^a: the weight against the sum
of its output row and of its input column (relative importance), times the input feature's norm
over the calibration tokens to the power a (0.5). As in the authors' code (lib/prune.py,
prune_ria): weights compete within the whole layer by default (their --per_outneuron, Wanda's
row-wise comparison, is `compare=row`); N:M keeps the best of every block of M; no weight update.

Channel permutation for N:M (their --reallocation, "heuristic channel reallocation", off in their
scripts): the input channels are sorted by their summed scores and dealt into the M positions of
the blocks (odd chunks reversed), so that every block mixes strong and weak channels; N:M is
chosen in that order and the mask put back in the layer's own order. The layer is then N:M
after that permutation of its inputs (which a deployment must apply), not in storage order. The
permutation is used only when it keeps a larger score sum than the plain N:M (the authors print
both and always keep the permuted one); their optional linear-sum-assignment refinement (--lsa)
is not implemented.
"""

from typing import Dict, Tuple

import torch
from torch import Tensor, nn

from ..config.options import RiaConfig
from ..core.granularity import Granularity
from ..core.layerwise import SquaredNorms
from . import LayerwiseCriterion, ScoreContext, register
from .wanda import activation_scores, prune_by_scores


@register("ria")
class Ria(LayerwiseCriterion):
    cfg: RiaConfig

    def score(self, ctx: ScoreContext) -> Dict[str, Tensor]:
        """Every layer's scores from the network as it is (one pass over the calibration inputs)."""
        return activation_scores(ctx, self.name, lambda w, norms: ria_scores(w, norms, self.cfg.a))

    def layer_stat(self, name: str) -> SquaredNorms:
        return SquaredNorms()

    def prune_layer(self, weight: nn.Parameter, stat: SquaredNorms, mask: Tensor, fraction: float,
                    granularity: Granularity) -> Tensor:
        scores = ria_scores(weight.detach(), stat.value, self.cfg.a)
        if self.cfg.sanity == "invert":
            scores = -scores
        if not (granularity.local and self.cfg.permute):
            return prune_by_scores(weight, scores, mask, fraction, granularity, self.cfg)
        keep, _ = permuted_nm_keep(scores, mask, granularity, granularity.pruned_per_block(fraction))
        new = keep.to(mask.dtype)
        with torch.no_grad():
            weight.mul_(new.to(weight.dtype))  # the layers after it see it pruned
        return new


def ria_scores(weight: Tensor, squared_norms: Tensor, a: float = 0.5) -> Tensor:
    """RIA's score for a weight viewed as (outputs, features), in float32 whatever its dtype. A row
    or column that is all zero scores 0 (the authors' code would divide 0 by 0)."""
    rows = weight.reshape(weight.shape[0], -1).abs().float()
    tiny = torch.finfo(torch.float32).tiny
    relative = rows / rows.sum(1, keepdim=True).clamp_min(tiny) + rows / rows.sum(0, keepdim=True).clamp_min(tiny)
    activation = squared_norms.double().pow(a / 2).float()  # ‖X_j‖₂^a from Σ x_j², in float64 first
    return (relative * activation.unsqueeze(0)).reshape(weight.shape)


def reallocation_order(scores: Tensor, m: int) -> Tensor:
    """The authors' heuristic channel reallocation: input channels sorted by their summed scores,
    cut into m chunks; chunk k fills position k of every block of m (every other chunk reversed),
    so each block gets one channel of each strength. Position p of the result holds channel order[p]."""
    columns = scores.shape[1]
    ranked = torch.sort(scores.sum(0)).indices
    order = torch.empty_like(ranked)
    for k in range(m):
        chunk = ranked[columns * k // m: columns * (k + 1) // m]
        order[k::m] = chunk if k % 2 == 0 else chunk.flip(0)
    return order


def permuted_nm_keep(scores: Tensor, mask: Tensor, granularity: Granularity, pruned: int) -> Tuple[Tensor, Tensor]:
    """(keep, order): the N:M keep mask chosen on the reallocated channels and put back in the
    layer's order, or the plain N:M mask (order = identity) when that keeps at least as much score."""
    rows = scores.reshape(scores.shape[0], -1).float()
    alive = mask.reshape(rows.shape) != 0
    g = torch.where(alive, rows, -torch.inf)  # pruned before: stays pruned

    def keep_in(order: Tensor) -> Tensor:
        keep = torch.empty_like(alive)
        keep[:, order] = granularity.keep_in_blocks(g[:, order].reshape(-1), pruned).reshape(rows.shape)
        return keep

    identity = torch.arange(rows.shape[1], device=rows.device)
    plain, order = keep_in(identity), reallocation_order(torch.where(alive, rows, 0.0), granularity.m)
    permuted = keep_in(order)
    if rows[permuted].sum() > rows[plain].sum():
        return permuted.reshape(mask.shape), order
    return plain.reshape(mask.shape), identity
