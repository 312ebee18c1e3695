"""LLM-Pruner's first-order Taylor importance (Ma, Fang & Wang 2023, "LLM-Pruner: on the
structural pruning of large language models"): removing a weight w changes the loss by about
|w · ∂L/∂w|; a unit's importance is that summed over every weight it owns: its q_proj rows and
o_proj columns (a key-value group also its k_proj and v_proj rows), or its gate_proj and up_proj
rows and down_proj column (the authors' element-wise `param_first`, grouped by `sum`). ∂L/∂w is
the gradient of the mean next-token loss over the calibration windows, of the dense model
(lm/structured.py accumulates it, one batch of windows at a time).
"""

from typing import Optional

from torch import Tensor, nn

from . import Criterion, UnitWeights, register


@register("taylor")
class Taylor(Criterion):
    granularities = ("width", "heads", "mlp")
    calibrates = True
    needs_gradients = True

    def score(self, ctx):
        raise NotImplementedError("criterion=taylor scores the structures of language models (lm/structured.py)")

    def feature_scores(self, unit: UnitWeights, stat=None) -> Tensor:
        score = salience(unit.reader).sum(0)
        for writer in unit.writers:
            score = score + salience(writer).sum(1)
        return score

    def kv_scores(self, unit: UnitWeights) -> Optional[Tensor]:
        return sum(salience(layer).sum(1) for layer in unit.kv) if unit.kv else None


def salience(layer: nn.Linear) -> Tensor:
    grad = layer.weight.grad
    if grad is None:
        raise ValueError("criterion=taylor needs the calibration loss's gradient of every scored layer")
    return (layer.weight.detach().float() * grad.float()).abs()
