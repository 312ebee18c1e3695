"""SynFlow (Tanaka et al. 2020): iterative synaptic flow pruning, data-free.

R = 1ᵀ(∏_l |θ^l|)1 is the network's output summed, for an all-ones input, with every
parameter replaced by its absolute value (the model in eval mode); the score is
|θ ⊙ ∂R/∂θ|. Pruning repeats `iterations` times (paper: 100), rescoring the masked network
each time, with the density shrinking exponentially to the round's target. The work is done
on one float64 copy, so the model's signs and values are untouched and the products of many
layers do not overflow.
"""

import copy
from typing import Dict

import torch
from torch import Tensor

from ..core.granularity import Granularity, Unstructured
from ..core.masks import Masks
from . import Criterion, ScoreContext, register


class SynapticFlow:
    """The network with every parameter and buffer replaced by its absolute value, in float64
    (a copy: the model's signs and values are untouched), and its masked weights' scores.
    Made once per pruning decision; each rescoring masks it further in place (masks only
    shrink, so |θ| ⊙ m_k is |θ| ⊙ m_{k-1} ⊙ m_k)."""

    def __init__(self, model, masks: Masks, input_shape):
        self.net = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            for t in list(self.net.parameters()) + [b for b in self.net.buffers() if b.is_floating_point()]:
                t.abs_()
        params = dict(self.net.named_parameters())
        self.names = masks.names()
        self.weights = [params[n] for n in self.names]
        self.x = torch.ones((1,) + tuple(input_shape), dtype=torch.float64, device=self.weights[0].device)

    def scores(self, masks: Masks) -> Dict[str, Tensor]:
        """|θ ⊙ ∂R/∂θ| of the network masked by `masks`."""
        with torch.no_grad():
            for n, w in zip(self.names, self.weights):
                w.mul_(masks[n].to(w))
        grads = torch.autograd.grad(self.net(self.x).sum(), self.weights)
        return {n: (w.detach() * g).abs().to(masks[n].dtype) for n, w, g in zip(self.names, self.weights, grads)}


def synaptic_flow(model, masks: Masks, input_shape) -> Dict[str, Tensor]:
    return SynapticFlow(model, masks, input_shape).scores(masks)


@register("synflow")
class Synflow(Criterion):
    # its iterative schedule steps through densities of single weights
    granularities = ("unstructured", "nm")
    layer_targets = False  # one global density schedule over its iterations

    def score(self, ctx: ScoreContext) -> Dict[str, Tensor]:
        return synaptic_flow(ctx.model, ctx.masks, ctx.input_shape)

    def select(self, scores: Dict[str, Tensor], ctx: ScoreContext, target: float,
               granularity: Granularity = Unstructured()) -> Masks:
        masks = ctx.masks
        start_density = 1.0 - masks.sparsity()
        end_density = 1.0 - target
        n = self.cfg.iterations
        flow = SynapticFlow(ctx.model, masks, ctx.input_shape) if n > 1 else None
        for k in range(1, n + 1):
            if self.cfg.schedule == "exponential":
                density = start_density * (end_density / start_density) ** (k / n)
            else:
                density = start_density + (end_density - start_density) * k / n
            if k > 1:
                scores = flow.scores(masks)
            masks = self.rank(scores, masks, target if k == n else 1.0 - density, granularity)
        return masks
