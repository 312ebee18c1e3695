"""Fresh magnitudes with the signs of θ0 on the prunable weights (Zhou et al. 2019)."""

import torch

from . import register


@register("sign_reinit")
@torch.no_grad()
def sign_reinit(model, masks, cfg, *, init_state, rewind_state, fresh_model) -> None:
    model.load_state_dict(fresh_model().state_dict())
    params = dict(model.named_parameters())
    for name in masks:
        w = params[name]
        sign = torch.sign(init_state[name]).to(w.device)
        w.copy_(w.abs() * torch.where(sign == 0, torch.ones_like(sign), sign))
