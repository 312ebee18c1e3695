"""Evaluation: accuracy = correct / total and the mean loss over every example of a split (over
several ranks, each evaluates its share of the batches and the sums are added)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.device import autocast, to_layout
from ..core.distributed import all_sum, world


@dataclass
class EvalResult:
    accuracy: float  # correct / total over the whole set
    loss: float  # mean cross-entropy over the whole set
    correct: int
    total: int


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
             precision: str = "fp32", channels_last: bool = False) -> EvalResult:
    """Accuracy = correct / total and mean loss over every example the batches hold (over
    several ranks: rank r evaluates the batches i ≡ r mod ranks, and the sums are added)."""
    model.eval()
    w = world()
    sums, device = [], None
    for i, (x, y) in enumerate(batches):
        device = x.device
        if i % w.size != w.rank:
            continue
        with autocast(precision, x.device):
            logits = model(to_layout(x, channels_last)).float()
        loss, correct = F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum()
        sums.append(torch.stack([loss.double(), correct.double(), torch.full_like(loss, y.shape[0]).double()]))
    if device is None:
        raise ValueError("evaluate() got no examples")
    mine = torch.stack(sums).sum(0) if sums else torch.zeros(3, dtype=torch.float64, device=device)
    loss_sum, correct, total = all_sum(mine).tolist()  # one sync for the whole set
    total = int(total)
    return EvalResult(int(correct) / total, loss_sum / total, int(correct), total)
