"""prunebench: train → score → mask → finetune experiments for neural-network pruning research.

The pieces work on any nn.Module from a script:

    from prunebench import Masks, ScoreContext, get_criterion, select_by_rank
    masks = Masks.ones(model)
    scores = get_criterion("magnitude").score(ScoreContext(model, masks))
    masks = select_by_rank(scores, masks, target=0.9)
    masks.apply(model)            # and masks.bind(model) to enforce them while training
"""

__version__ = "0.1.0"

from .config import ConfigError  # noqa: E402  (torch-free: the command line checks configs with it)

# the rest of the API imports torch: loaded on first use (PEP 562), so that `prunebench` answers a
# wrong option before torch is imported
LAZY = {"Masks": "core.masks", "prunable_weights": "core.masks", "SelectOptions": "core.select",
        "select_by_rank": "core.select", "select_by_threshold": "core.select", "CRITERIA": "criteria",
        "Criterion": "criteria", "ScoreContext": "criteria", "build_criterion": "criteria", "register": "criteria",
        "weight_stats": "core.metrics"}


def __getattr__(name: str):
    if name in LAZY:
        import importlib

        return getattr(importlib.import_module(f".{LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def compose(*overrides: str):
    """The validated Config that `prunebench OVERRIDES...` would run, for scripts and notebooks."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from .config import options  # noqa: F401  (registers the schemas)
    from .config import load_config, with_mapping_overrides

    with initialize_config_module(config_module="prunebench.conf", version_base="1.3"):
        return load_config(hydra_compose(config_name="config", overrides=with_mapping_overrides(list(overrides))))


def get_criterion(name: str, **options):
    """A criterion by its config name, with its default options unless given."""
    from .criteria import CRITERIA

    cls = CRITERIA.get(name)
    return cls(cls.config_class(name=name, **options))


__all__ = ["ConfigError", "Masks", "prunable_weights", "SelectOptions", "select_by_rank",
           "select_by_threshold", "CRITERIA", "Criterion", "ScoreContext", "build_criterion",
           "register", "get_criterion", "weight_stats", "compose"]
