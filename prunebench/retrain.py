"""What the surviving weights start from before fine-tuning (the retrain policy)."""

from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import Tensor, nn

from .masks import Masks


def snapshot(model: nn.Module) -> Dict[str, Tensor]:
    """A detached copy of every parameter and buffer."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def retain(model: nn.Module, masks: Masks, *, init_state, rewind_state, fresh_model) -> None:
    """Keep the trained surviving weights (Han et al. 2015)."""


def rewind(model: nn.Module, masks: Masks, *, init_state, rewind_state, fresh_model) -> None:
    """Reset every parameter and buffer to θ0, or to the weights after epoch k (Frankle & Carbin)."""
    model.load_state_dict(rewind_state)


def reinit(model: nn.Module, masks: Masks, *, init_state, rewind_state, fresh_model) -> None:
    """A fresh random initialisation with the same masks (the lottery-ticket control)."""
    model.load_state_dict(fresh_model().state_dict())


@torch.no_grad()
def sign_reinit(model: nn.Module, masks: Masks, *, init_state, rewind_state, fresh_model) -> None:
    """Fresh magnitudes with the signs of θ0 on the prunable weights (Zhou et al. 2019)."""
    model.load_state_dict(fresh_model().state_dict())
    params = dict(model.named_parameters())
    for name in masks:
        w = params[name]
        sign = torch.sign(init_state[name]).to(w.device)
        w.copy_(w.abs() * torch.where(sign == 0, torch.ones_like(sign), sign))


POLICIES: Dict[str, Callable] = {
    "retain": retain, "rewind": rewind, "reinit": reinit, "sign_reinit": sign_reinit}


def apply_policy(name: str, model: nn.Module, masks: Masks, *, init_state: Dict[str, Tensor],
                 rewind_state: Dict[str, Tensor], fresh_model: Callable[[], nn.Module]) -> None:
    """Set the weights per the policy, then zero the pruned ones.

    init_state: θ0; rewind_state: the rewind target (θ0 or the weights after epoch k);
    fresh_model: builds a newly initialised model of the same architecture.
    """
    POLICIES[name](model, masks, init_state=init_state, rewind_state=rewind_state,
                   fresh_model=fresh_model)
    masks.apply(model)
