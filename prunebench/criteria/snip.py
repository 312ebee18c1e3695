"""SNIP (Lee et al. 2019): connection sensitivity at initialisation.

S(θ_q) = |θ_q · ∂L/∂θ_q|, the magnitude of the loss's derivative with respect to a
multiplicative gate c_q = 1 on each weight, on `batches` mini-batches of training data. The
paper divides by the sum of all scores; a positive constant does not change the ranking, so
it is left out. The network is scored in inference mode (batch norm on its running
statistics) unless `bn_mode=train`.
"""

from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor

from . import Criterion, ScoreContext, register


def summed_gradients(model, params, batches, count: int, train_mode: bool):
    """∂L/∂θ summed over `count` mini-batches (mean loss per batch), model mode restored after."""
    was_training = model.training
    model.train(train_mode)
    grads = [torch.zeros_like(p) for p in params]
    it = iter(batches())
    try:
        for _ in range(count):
            x, y = next(it)
            loss = F.cross_entropy(model(x), y)
            for acc, g in zip(grads, torch.autograd.grad(loss, params)):
                acc += g
    finally:
        model.train(was_training)
    return grads


@register("snip")
class Snip(Criterion):
    granularities = Criterion.granularities + ("width", "heads", "mlp")  # also a ViT's heads and MLP channels

    def score(self, ctx: ScoreContext) -> Dict[str, Tensor]:
        params = ctx.params()
        grads = summed_gradients(ctx.model, list(params.values()), ctx.batches, self.cfg.batches,
                                 self.cfg.bn_mode == "train")
        return {n: (p.detach() * g).abs() for (n, p), g in zip(params.items(), grads)}
