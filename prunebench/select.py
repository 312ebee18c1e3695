"""Scores -> masks.

Rules every selection obeys:
- `target` is the fraction of *all* prunable weights that are zero afterwards (excluded layers
  count as dense), so the reported sparsity means the same thing under every scope.
- A weight pruned earlier stays pruned: its group scores -inf, so it is always among the removed.
- Each pruned layer keeps at least `min_density` of its groups (the best-scored ones).
- Higher score = more important = kept. Ties break by position (stable sort): deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List

import torch
from torch import Tensor

from .config import ConfigError
from .granularity import Granularity, Unstructured
from .masks import Masks


@dataclass
class SelectOptions:
    scope: str = "global"  # global | layer
    exclude_first: bool = False
    exclude_last: bool = False
    min_density: float = 0.0

    @classmethod
    def of(cls, cfg) -> "SelectOptions":
        """From any config carrying these fields (CriterionConfig does)."""
        return cls(cfg.scope, cfg.exclude_first, cfg.exclude_last, cfg.min_density)


def module_of(name: str) -> str:
    return name.rpartition(".")[0]


def layers_in_scope(masks: Masks, opts: SelectOptions) -> List[str]:
    """The masked parameters selection may prune: all but those of an excluded first/last layer."""
    names = masks.names()
    if not names:
        return []
    excluded = set()
    if opts.exclude_first:
        excluded.add(module_of(names[0]))
    if opts.exclude_last:
        excluded.add(module_of(names[-1]))
    return [n for n in names if module_of(n) not in excluded]


def _min_kept_groups(n_groups: int, min_density: float) -> int:
    return min(n_groups, math.ceil(min_density * n_groups - 1e-9))


def max_sparsity(masks: Masks, opts: SelectOptions, granularity: Granularity = Unstructured()) -> float:
    """The highest sparsity that the exclusions and the minimum density allow."""
    removable = 0
    for name in layers_in_scope(masks, opts):
        shape = masks[name].shape
        size = granularity.group_size(shape)
        n_groups = masks[name].numel() // size
        removable += (n_groups - _min_kept_groups(n_groups, opts.min_density)) * size
    return removable / masks.numel()


def check_reachable(target: float, masks: Masks, opts: SelectOptions,
                    granularity: Granularity = Unstructured()) -> None:
    names = layers_in_scope(masks, opts)
    if not names:
        raise ConfigError("every prunable layer is excluded (criterion.exclude_first/exclude_last)")
    limit = max_sparsity(masks, opts, granularity)
    if opts.scope == "layer":
        in_scope = sum(masks[n].numel() for n in names)
        per_layer = target * masks.numel() / in_scope
        if per_layer > 1.0 - opts.min_density + 1e-9:
            raise ConfigError(
                f"sparsity={target:g} needs {per_layer:.4g} sparsity in every pruned layer with "
                f"criterion.scope=layer and these exclusions; at most {1 - opts.min_density:g} "
                f"(criterion.min_density={opts.min_density:g})")
    if target > limit + 1e-9:
        raise ConfigError(
            f"sparsity={target:g} cannot be reached: with criterion.exclude_first="
            f"{opts.exclude_first}, exclude_last={opts.exclude_last}, min_density={opts.min_density:g} "
            f"at most {limit:.4g} of the prunable weights can be removed")


def _prepared_group_scores(name: str, score: Tensor, masks: Masks, opts: SelectOptions,
                           granularity: Granularity) -> Tensor:
    """Group scores with already-pruned groups at -inf and the min-density reserve at +inf."""
    g = granularity.group_scores(score.detach()).to(torch.float64).clone()
    if torch.isnan(g).any():
        raise FloatingPointError(f"the criterion gave NaN scores for {name}")
    alive = granularity.alive(masks[name]).to(g.device)
    g[~alive] = -math.inf
    reserve = min(_min_kept_groups(g.numel(), opts.min_density), int(alive.count_nonzero()))
    if reserve:
        best = torch.topk(torch.where(alive, g, torch.full_like(g, -math.inf)), reserve).indices
        g[best] = math.inf
    return g


def _prune_lowest(g: Tensor, sizes: Tensor, n_weights: int) -> Tensor:
    """Bool per group, True = kept: removes the lowest-scored groups up to n_weights weights.

    Groups at -inf (already pruned) are always removed, groups at +inf (reserved) never; ties
    are removed in position order (as a stable sort would).
    """
    if bool((sizes == 1).all()):  # single weights: a k-th value instead of a full sort
        n_remove = n_weights
    else:
        order = torch.argsort(g, stable=True)
        removed_weights = torch.cumsum(sizes[order], 0)
        n_remove = int(torch.searchsorted(removed_weights, torch.tensor(
            n_weights, device=g.device, dtype=removed_weights.dtype), right=True))
    n_remove = max(n_remove, int(torch.isneginf(g).count_nonzero()))
    n_remove = min(n_remove, g.numel() - int(torch.isposinf(g).count_nonzero()))
    keep = torch.ones_like(g, dtype=torch.bool)
    if n_remove == 0:
        return keep
    kth = torch.kthvalue(g.cpu(), n_remove).values.to(g.device)
    below = g < kth
    keep[below] = False
    tied = (g == kth).nonzero().squeeze(1)
    keep[tied[:n_remove - int(below.count_nonzero())]] = False
    return keep


def select_by_rank(scores: Dict[str, Tensor], masks: Masks, target: float,
                   opts: SelectOptions = SelectOptions(),
                   granularity: Granularity = Unstructured()) -> Masks:
    """Masks with `target` of all prunable weights removed, lowest scores first."""
    check_reachable(target, masks, opts, granularity)
    names = layers_in_scope(masks, opts)
    total_to_remove = round(target * masks.numel())
    groups = {n: _prepared_group_scores(n, scores[n], masks, opts, granularity) for n in names}
    sizes = {n: torch.full_like(groups[n], granularity.group_size(masks[n].shape)) for n in names}

    keep: Dict[str, Tensor] = {}
    if opts.scope == "global":
        flat_keep = _prune_lowest(torch.cat([groups[n] for n in names]),
                                  torch.cat([sizes[n] for n in names]), total_to_remove)
        for n, part in zip(names, torch.split(flat_keep, [groups[n].numel() for n in names])):
            keep[n] = part
    elif opts.scope == "layer":
        per_layer = total_to_remove / sum(masks[n].numel() for n in names)
        for n in names:
            keep[n] = _prune_lowest(groups[n], sizes[n], round(per_layer * masks[n].numel()))
    else:
        raise ConfigError(f"criterion.scope={opts.scope!r} is not one of: global, layer")
    return _assemble(masks, keep, granularity)


def select_by_threshold(scores: Dict[str, Tensor], masks: Masks, thresholds: Dict[str, float],
                        opts: SelectOptions = SelectOptions(),
                        granularity: Granularity = Unstructured()) -> Masks:
    """Masks removing every group whose score is below its layer's threshold."""
    keep: Dict[str, Tensor] = {}
    for n in layers_in_scope(masks, opts):
        g = _prepared_group_scores(n, scores[n], masks, opts, granularity)
        keep[n] = g >= thresholds[n]
    return _assemble(masks, keep, granularity)


def _assemble(masks: Masks, keep: Dict[str, Tensor], granularity: Granularity) -> Masks:
    out = {}
    for n, old in masks.items():
        if n in keep:
            new = granularity.expand(keep[n], old.shape).to(old.device, old.dtype)
            out[n] = new * old  # belt and braces: nothing pruned comes back
        else:
            out[n] = old.clone()
    return Masks(out)
