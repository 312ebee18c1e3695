"""How much of each layer is pruned: every per-layer budget rule in one place (jaxpruner's
sparsity_distributions). *When* (a schedule's targets over rounds or steps: config/) and *which
pattern* (granularity.py) live apart; selection (select.py) turns a layer's share into masks.

- uniform (criterion.scope=layer): the same sparsity in every layer in scope (`layer_fractions`);
- layer_rates (LTH's per-layer rates per round: `layer_rate_targets`);
- stage ratios (Li et al.: one ratio per stage of a structured network: `stage_targets`);
- ER / ERK (dynamic sparse training: `layer_densities`).
A new rule (OWL's outlier-weighted sparsities, FLAP's adaptive one) is one function here and its
options.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from ..config import ConfigError
from .granularity import Granularity
from .masks import Masks
from .select import UNSTRUCTURED, SelectOptions, Target, check_reachable, layers_in_scope


def layer_fractions(target: Target, masks: Masks, opts: SelectOptions,
                    granularity: Granularity = UNSTRUCTURED) -> Dict[str, float]:
    """The sparsity of each layer in scope when every layer gets the same one (scope=layer):
    what `target` (of all prunable weights, or of the N:M layers) means per layer, or the
    layer's own with criterion.layer_rates. For criteria that decide layer by layer."""
    if opts.scope != "layer":
        raise ConfigError(f"layer-by-layer selection needs criterion.scope=layer, got {opts.scope}")
    check_reachable(target, masks, opts, granularity)
    names = layers_in_scope(masks, opts, granularity)
    if isinstance(target, dict):
        return {n: target[n] for n in names}
    if granularity.local:
        return dict.fromkeys(names, target)
    in_scope = sum(masks[n].numel() for n in names)
    return dict.fromkeys(names, target * granularity.total(masks) / in_scope)


def layer_densities(distribution: str, shapes: Dict[str, torch.Size], dense: List[str], sparsity: float,
                    total: int) -> Dict[str, float]:
    """Each sparse layer's density, so that all `total` prunable weights (the `dense` layers' kept
    whole) reach `sparsity`. uniform: one density; er: ∝ (C_in + C_out)/(C_in·C_out); erk: ∝
    Σ dims/Π dims (kernel dims too). A layer the scale would make denser than 1 is kept dense and
    the others rescaled (Evci et al.'s procedure)."""
    kept_total = (1.0 - sparsity) * total
    dense = set(dense)
    while True:
        sparse = [n for n in shapes if n not in dense]
        if not sparse:
            raise ConfigError(f"sparsity={sparsity} cannot be reached: every layer would have to be dense")
        budget = kept_total - sum(shapes[n].numel() for n in dense)
        raw = {n: 1.0 if distribution == "uniform" else
               (shapes[n][0] + shapes[n][1]) / (shapes[n][0] * shapes[n][1]) if distribution == "er" else
               sum(shapes[n]) / math.prod(shapes[n]) for n in sparse}
        scale = budget / sum(raw[n] * shapes[n].numel() for n in sparse)
        if scale <= 0:
            raise ConfigError(f"sparsity={sparsity} is below what the dense layers alone keep")
        too_dense = [n for n in sparse if raw[n] * scale > 1.0]
        if not too_dense:
            return {n: raw[n] * scale for n in sparse}
        dense.add(max(too_dense, key=lambda n: raw[n]))


def layer_rate_targets(rates: Dict[str, float], default: float, rounds: int, masks: Masks) -> List[Dict[str, float]]:
    """Sparsity of each layer after each round when round r removes rate_l of what remains."""
    modules = [n.rpartition(".")[0] for n in masks]
    unmatched = [k for k in rates if not any(m.startswith(k) for m in modules)]
    if unmatched:
        raise ConfigError(f"criterion.layer_rates keys match no prunable layer: {', '.join(unmatched)} "
                          f"(layers: {', '.join(modules)})")


    def rate(module: str) -> float:
        keys = [k for k in rates if module.startswith(k)]
        return rates[max(keys, key=len)] if keys else default


    return [{n: 1.0 - (1.0 - rate(n.rpartition(".")[0])) ** r for n in masks} for r in range(1, rounds + 1)]


def stage_targets(ratios: Sequence[float], rounds_of: Callable[[float], List[float]]) -> List[Tuple[float, ...]]:
    """Each round's ratio for every stage: each stage's final ratio spread on the schedule's rounds."""
    per_stage = [rounds_of(p) for p in ratios]
    return [tuple(stage[r] for stage in per_stage) for r in range(len(per_stage[0]))]
