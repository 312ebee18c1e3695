"""What the surviving weights start from before fine-tuning (the retrain policy), by name.

A policy sets the model's weights in place and may return diagnostics for the round's record.
To add one, write `retrain/<name>.py` with a function decorated `@register("<name>")` (and its
own config dataclass, a `RetrainConfig` subclass, if it has options), then
`conf/retrain/<name>.yaml` starting from `retrain_<name>_schema` (or `retrain_schema`).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Dict, Optional

from torch import Tensor, nn

from ..config import RetrainConfig
from ..config.registry import Registry
from ..core.masks import Masks

# (model, masks, cfg, *, init_state, rewind_state, fresh_model) -> diagnostics or None
Policy = Callable[..., Optional[Dict]]
POLICIES = Registry("retrain")
register = POLICIES.register  # function decorator: make a policy available as `retrain=<name>`


def check_policy(cfg: RetrainConfig) -> None:
    POLICIES.get(cfg.name)


def snapshot(model: nn.Module) -> Dict[str, Tensor]:
    """A detached copy of every parameter and buffer."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def apply_policy(cfg: RetrainConfig, model: nn.Module, masks: Masks, *, init_state: Dict[str, Tensor],
                 rewind_state: Dict[str, Tensor], fresh_model: Callable[[], nn.Module]) -> Optional[Dict]:
    """Set the weights per the policy, then zero the pruned ones.

    init_state: θ0; rewind_state: the rewind target (θ0 or the weights after epoch k);
    fresh_model: builds a newly initialised model of the same architecture.
    """
    diagnostics = POLICIES.get(cfg.name)(model, masks, cfg, init_state=init_state, rewind_state=rewind_state,
                                         fresh_model=fresh_model)
    masks.apply(model)
    return diagnostics


# import every module in this package so each registers itself
for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
