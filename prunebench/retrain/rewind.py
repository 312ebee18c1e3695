"""Rewind the survivors to θ0, or to the weights after epoch k of pretraining (Frankle & Carbin
2019; Frankle et al. 2020)."""


from . import register


@register("rewind")
def rewind(model, masks, cfg, *, init_state, rewind_state, fresh_model) -> None:
    """Reset every parameter and buffer to the rewind point."""
    model.load_state_dict(rewind_state)
