"""GraSP (Wang et al. 2020): preserve the gradient flow at initialisation.

The paper scores S(−θ) = −θ ⊙ Hg, with g the loss gradient and Hg the Hessian-gradient
product, and removes the weights with the largest S. Here score = θ ⊙ Hg (= −S, so the
highest are kept, as everywhere in prunebench). Hg comes from a double backward, no explicit
Hessian: g = Σ ∇L on the first pass (no graph), then z = gᵀ∇L with the graph, Hg = ∇z.

Choices the paper leaves open follow the authors' code, as options: a class-balanced batch of
`samples_per_class` examples per class, split in two halves for the passes; logits divided
by `temperature` (200); the network scored in training mode on a copy, so the model's
batch-norm statistics are untouched (and SyncBatchNorm, which has no second derivative, computes
there as the plain batch norm it equals on one batch).
"""

import copy
import logging
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.curvature import twice_differentiable, without_sync_batchnorm
from . import Criterion, ScoreContext, register

log = logging.getLogger("prunebench")


def balanced_batch(batches, num_classes: int, per_class: int) -> Tuple[Tensor, Tensor]:
    """`per_class` examples of every class, drawn from the shuffled training batches."""
    xs: List[List[Tensor]] = [[] for _ in range(num_classes)]
    for x, y in batches():
        for c in range(num_classes):
            need = per_class - sum(len(t) for t in xs[c])
            if need > 0:
                xs[c].append(x[y == c][:need])
        if all(sum(len(t) for t in xs[c]) >= per_class for c in range(num_classes)):
            break
    short = [c for c in range(num_classes) if sum(len(t) for t in xs[c]) < per_class]
    if short:
        log.warning(f"GraSP: classes {short} have fewer than {per_class} training examples; using what there is")
    x = torch.cat([torch.cat(t) for t in xs if t])
    y = torch.cat([torch.full((sum(len(a) for a in t),), c, dtype=torch.long, device=x.device)
                   for c, t in enumerate(xs) if t])
    return x, y


def hessian_gradient_product(model, params: Sequence[Tensor], halves: Sequence[Tuple[Tensor, Tensor]],
                             temperature: float) -> List[Tensor]:
    """Hg with H and g of L = Σ_h CE(model(x_h) / T, y_h): two passes per half, no explicit H."""

    def loss(x, y):
        return F.cross_entropy(model(x) / temperature, y)

    g = [torch.zeros_like(p) for p in params]
    for x, y in halves:
        for acc, gi in zip(g, torch.autograd.grad(loss(x, y), params)):
            acc += gi
    z = 0
    with twice_differentiable():
        for x, y in halves:
            grads = torch.autograd.grad(loss(x, y), params, create_graph=True)
            z = z + sum((gi * gf).sum() for gi, gf in zip(g, grads))
        return list(torch.autograd.grad(z, params))


@register("grasp")
class Grasp(Criterion):
    granularities = Criterion.granularities + ("width", "heads", "mlp")  # also a ViT's heads and MLP channels

    def score(self, ctx: ScoreContext) -> Dict[str, Tensor]:
        net = without_sync_batchnorm(copy.deepcopy(ctx.model))  # train.sync_bn: Hg needs a double backward
        net.train(self.cfg.bn_mode == "train")
        params = dict(net.named_parameters())
        names = ctx.masks.names()
        weights = [params[n] for n in names]
        halves = []
        for _ in range(self.cfg.iterations):
            x, y = balanced_batch(ctx.batches, ctx.num_classes, self.cfg.samples_per_class)
            half = x.shape[0] // 2
            halves += [(x[:half], y[:half]), (x[half:], y[half:])]
        hg = hessian_gradient_product(net, weights, halves, self.cfg.temperature)
        return {n: (w.detach() * h).to(ctx.masks[n].device) for n, w, h in zip(names, weights, hg)}
