"""Keep the trained surviving weights (Han et al. 2015)."""

from . import register


@register("retain")
def retain(model, masks, cfg, *, init_state, rewind_state, fresh_model) -> None:
    """Nothing to do: the survivors fine-tune from their trained values."""
