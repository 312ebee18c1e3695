"""Expert frequency: how often the router chooses each expert over the calibration tokens (each
token counts once for each of its top-k experts); the least chosen experts are removed
(granularity=experts). The baseline of expert pruning (e.g. Lu et al. 2024, "Not all experts are
equal"; REAP's `frequency`)."""

from typing import Optional

import torch
from torch import Tensor

from . import Criterion, Routed, register


class Choices:
    def __init__(self, experts: int):
        self.counts = torch.zeros(experts, dtype=torch.float64)

    def __call__(self, routed: Routed) -> None:
        self.counts += torch.bincount(routed.index.reshape(-1).cpu(), minlength=routed.experts).double()


@register("frequency")
class Frequency(Criterion):
    granularities = ("experts",)
    calibrates = True
    layer_targets = False

    def expert_stat(self, experts: int) -> Choices:
        return Choices(experts)

    def expert_scores(self, stat: Choices, experts: int, generator: Optional[torch.Generator]) -> Tensor:
        return stat.counts
