"""A fresh random initialisation with the same masks (the lottery-ticket control)."""

from . import register


@register("reinit")
def reinit(model, masks, cfg, *, init_state, rewind_state, fresh_model) -> None:
    model.load_state_dict(fresh_model().state_dict())
