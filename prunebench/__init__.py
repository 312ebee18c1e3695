"""prunebench: train → score → mask → finetune experiments for neural-network pruning research.

The pieces work on any nn.Module from a script:

    from prunebench import Masks, ScoreContext, get_criterion, select_by_rank
    masks = Masks.ones(model)
    scores = get_criterion("magnitude").score(ScoreContext(model, masks))
    masks = select_by_rank(scores, masks, target=0.9)
    masks.apply(model)            # and masks.bind(model) to enforce them while training
"""

__version__ = "0.1.0"

from .config import ConfigError  # noqa: E402
from .masks import Masks, prunable_weights  # noqa: E402
from .select import SelectOptions, select_by_rank, select_by_threshold  # noqa: E402
from .criteria import CRITERIA, Criterion, ScoreContext, build_criterion, register  # noqa: E402
from .metrics import weight_stats  # noqa: E402


def compose(*overrides: str):
    """The validated Config that `prunebench OVERRIDES...` would run, for scripts and notebooks."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from . import data, models, retrain  # noqa: F401  (register their schemas)
    from .config import load_config, with_mapping_overrides

    with initialize_config_module(config_module="prunebench.conf", version_base="1.3"):
        return load_config(hydra_compose(config_name="config", overrides=with_mapping_overrides(list(overrides))))


def get_criterion(name: str, **options) -> Criterion:
    """A criterion by its config name, with its default options unless given."""
    if name not in CRITERIA:
        raise ConfigError(f"criterion={name!r} is not one of: {', '.join(sorted(CRITERIA))}")
    cls = CRITERIA[name]
    return cls(cls.config_class(name=name, **options))


__all__ = ["ConfigError", "Masks", "prunable_weights", "SelectOptions", "select_by_rank",
           "select_by_threshold", "CRITERIA", "Criterion", "ScoreContext", "build_criterion",
           "register", "get_criterion", "weight_stats", "compose"]
