"""SynFlow (Tanaka et al. 2020): iterative synaptic flow pruning, data-free.

R = 1ᵀ(∏_l |θ^l|)1 is the network's output summed, for an all-ones input, with every
parameter replaced by its absolute value (the model in eval mode); the score is
|θ ⊙ ∂R/∂θ|. Pruning repeats `iterations` times (paper: 100), rescoring the masked network
each time, with the density shrinking exponentially to the round's target. The work is done
on a float64 copy, so the model's signs and values are untouched and the products of many
layers do not overflow.
"""

import copy
from typing import Dict

import torch
from torch import Tensor

from ..granularity import Granularity, Unstructured
from ..masks import Masks
from . import Criterion, ScoreContext, register


def synaptic_flow(model, masks: Masks, input_shape) -> Dict[str, Tensor]:
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for t in list(net.parameters()) + [b for b in net.buffers() if b.is_floating_point()]:
            t.abs_()
        params = dict(net.named_parameters())
        for n, m in masks.items():
            params[n].mul_(m.to(params[n]))
    weights = [params[n] for n in masks]
    x = torch.ones((1,) + tuple(input_shape), dtype=torch.float64, device=weights[0].device)
    grads = torch.autograd.grad(net(x).sum(), weights)
    return {n: (w.detach() * g).abs().to(masks[n].dtype) for n, w, g in zip(masks.names(), weights, grads)}


@register("synflow")
class Synflow(Criterion):
    # its iterative schedule steps through densities of single weights
    granularities = ("unstructured",)
    layer_targets = False  # one global density schedule over its iterations
    def score(self, ctx: ScoreContext) -> Dict[str, Tensor]:
        return synaptic_flow(ctx.model, ctx.masks, ctx.input_shape)

    def select(self, scores: Dict[str, Tensor], ctx: ScoreContext, target: float,
               granularity: Granularity = Unstructured()) -> Masks:
        masks = ctx.masks
        start_density = 1.0 - masks.sparsity()
        end_density = 1.0 - target
        n = self.cfg.iterations
        for k in range(1, n + 1):
            if self.cfg.schedule == "exponential":
                density = start_density * (end_density / start_density) ** (k / n)
            else:
                density = start_density + (end_density - start_density) * k / n
            if k > 1:
                scores = synaptic_flow(ctx.model, masks, ctx.input_shape)
            masks = self.rank(scores, masks, target if k == n else 1.0 - density, granularity)
        return masks
