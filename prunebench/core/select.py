"""Scores -> masks.

Rules every selection obeys:
- `target` is the fraction of *all* groups removed afterwards: of all prunable weights
  (unstructured) or of all units (filter/channel), excluded layers counting as kept, so it means
  the same thing under every scope. With scope=stage it may be one fraction per stage.
- A weight pruned earlier stays pruned: its group scores -inf, so it is always among the removed.
- Each pruned layer keeps at least `min_density` of its groups (the best-scored ones), and one
  unit at least under structured pruning.
- Higher score = more important = kept. Ties break by position (stable sort): deterministic.
- N:M (granularity.local): `target` is of the layers the pattern covers, and each block of M
  weights keeps its best, whatever the scope.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..config import ConfigError
from .granularity import Granularity, Unstructured
from .masks import Masks

UNSTRUCTURED = Unstructured()


@dataclass
class SelectOptions:
    scope: str = "global"  # global | layer | stage
    exclude_first: bool = False
    exclude_last: bool = False
    min_density: float = 0.0
    exclude: Sequence[str] = ()  # module names left dense

    @classmethod
    def of(cls, cfg) -> "SelectOptions":
        """From any config carrying these fields (CriterionConfig does)."""
        return cls(cfg.scope, cfg.exclude_first, cfg.exclude_last, cfg.min_density, tuple(cfg.exclude))


# a round's target: one fraction, or one per stage (scope=stage), or one per layer (layer_rates)
Target = Union[float, Sequence[float], Dict[str, float]]


def module_of(name: str) -> str:
    return name.rpartition(".")[0]


def layers_in_scope(masks: Masks, opts: SelectOptions, granularity: Granularity = UNSTRUCTURED) -> List[str]:
    """The group owners selection may prune: all but excluded layers (first/last prunable layer,
    or named in `exclude`)."""
    names = masks.names()
    if not names:
        return []
    excluded = set(opts.exclude)
    if opts.exclude_first:
        excluded.add(module_of(names[0]))
    if opts.exclude_last:
        excluded.add(module_of(names[-1]))
    owners = [n for n in granularity.owners(masks) if module_of(n) not in excluded]
    if granularity.structured and opts.exclude_last:
        # the classifier has no units of its own: it stays dense when the units it reads stay
        last = module_of(names[-1]) + ".weight"
        owners = [n for n in owners
                  if all(s.param != last for s in granularity.structure.producers[n].consumers())]
    return owners


def check_exclusions(masks: Masks, opts: SelectOptions) -> None:
    modules = {module_of(n) for n in masks}
    unknown = [m for m in opts.exclude if m not in modules]
    if unknown:
        raise ConfigError(f"criterion.exclude names no prunable layer: {', '.join(unknown)} "
                          f"(prunable layers: {', '.join(sorted(modules))})")


def _min_kept_groups(n_groups: int, min_density: float, structured: bool) -> int:
    # a structured layer keeps one unit at least: a layer without channels cuts the network
    return min(n_groups, max(int(structured), math.ceil(min_density * n_groups - 1e-9)))


def max_sparsity(masks: Masks, opts: SelectOptions, granularity: Granularity = UNSTRUCTURED) -> float:
    """The highest sparsity that the exclusions and the minimum density allow."""
    removable = 0
    for name in layers_in_scope(masks, opts, granularity):
        n_groups = granularity.group_count(name, masks)
        kept = _min_kept_groups(n_groups, opts.min_density, granularity.structured)
        removable += (n_groups - kept) * granularity.group_size(name, masks)
    return removable / granularity.total(masks)


def stage_of(name: str, granularity: Granularity) -> int:
    return granularity.structure.producers[name].stage


def check_reachable(target: Target, masks: Masks, opts: SelectOptions,
                    granularity: Granularity = UNSTRUCTURED) -> None:
    check_exclusions(masks, opts)
    names = layers_in_scope(masks, opts, granularity)
    if not granularity.owners(masks):
        raise ConfigError(f"granularity={granularity.name}: no prunable layer ({', '.join(masks.names())}) has "
                          f"groups of its own to remove")
    if not names:
        raise ConfigError("every prunable layer is excluded (criterion.exclude_first/exclude_last/exclude)")
    if granularity.local:  # N:M: the pattern fixes each layer's density, whatever the scope
        limit = 1.0 - granularity.n / granularity.m
        if not isinstance(target, float) or target > limit + 1e-9 or opts.min_density > 1.0 - limit + 1e-9:
            raise ConfigError(f"granularity=nm {granularity.n}:{granularity.m} prunes at most {limit:g} of every "
                              f"block (got target {target}, criterion.min_density={opts.min_density:g})")
        return
    if opts.scope == "stage":
        if not granularity.structured:
            raise ConfigError("criterion.scope=stage needs granularity=filter or channel")
        stages = granularity.structure.stage_count
        if not isinstance(target, (int, float)) and len(target) != stages:
            raise ConfigError(f"criterion.stage_ratios has {len(target)} values; this model has {stages} "
                              f"stages: {_describe_stages(granularity)}")
        ratios = [target] * stages if isinstance(target, (int, float)) else list(target)
        for n in names:
            n_groups = granularity.group_count(n, masks)
            keep = _min_kept_groups(n_groups, opts.min_density, True)
            if round(ratios[stage_of(n, granularity)] * n_groups) > n_groups - keep:
                raise ConfigError(f"a ratio of {ratios[stage_of(n, granularity)]:g} would leave {module_of(n)} "
                                  f"fewer than {keep} of its {n_groups} units")
        return
    if isinstance(target, dict):
        for n in names:
            if target[n] > 1.0 - opts.min_density + 1e-9:
                raise ConfigError(f"{module_of(n)} would reach sparsity {target[n]:.4g}; criterion.min_density="
                                  f"{opts.min_density:g} allows at most {1 - opts.min_density:g}")
        return
    in_scope = sum(granularity.group_count(n, masks) * granularity.group_size(n, masks) for n in names)
    if opts.scope == "layer":
        per_layer = target * granularity.total(masks) / in_scope
        if per_layer > 1.0 - opts.min_density + 1e-9:
            raise ConfigError(
                f"sparsity={target:g} needs {per_layer:.4g} sparsity in every pruned layer with "
                f"criterion.scope=layer and these exclusions; at most {1 - opts.min_density:g} "
                f"(criterion.min_density={opts.min_density:g})")
    limit = max_sparsity(masks, opts, granularity)
    if target > limit + 1e-9:
        what = "units" if granularity.structured else "prunable weights"
        raise ConfigError(
            f"sparsity={target:g} cannot be reached: with criterion.exclude_first="
            f"{opts.exclude_first}, exclude_last={opts.exclude_last}, exclude={list(opts.exclude)}, "
            f"min_density={opts.min_density:g} at most {limit:.4g} of the {what} can be removed")


def _describe_stages(granularity: Granularity) -> str:
    by_stage: Dict[int, List[str]] = {}
    for p in granularity.structure.producers.values():
        by_stage.setdefault(p.stage, []).append(p.module)
    return "; ".join(f"{s + 1}: {', '.join(m)}" for s, m in sorted(by_stage.items()))


def _prepared_group_scores(name: str, scores: Dict[str, Tensor], masks: Masks, opts: SelectOptions,
                           granularity: Granularity) -> Tensor:
    """Group scores with already-pruned groups at -inf and the min-density reserve at +inf.

    Single weights keep their scores' precision (at least float32: widening is exact, so the
    order and the ties are the same); sums over a group are taken in float64."""
    g = granularity.group_scores(name, {k: v.detach() for k, v in scores.items()})
    g = g.to(torch.float64 if granularity.structured else torch.promote_types(g.dtype, torch.float32))
    alive = granularity.alive(name, masks).to(g.device)
    g = torch.where(alive, g, -math.inf)  # a new tensor: the criterion's scores stay as they are
    # N:M fixes every layer's density (min_density is checked against it instead)
    reserve = 0 if granularity.local else _min_kept_groups(g.numel(), opts.min_density, granularity.structured)
    if reserve:
        reserve = min(reserve, int(alive.count_nonzero()))
        best = torch.topk(g, reserve).indices  # the best alive ones (dead are at -inf)
        g[best] = math.inf
    return g


def kth_smallest(g: Tensor, k: int) -> Tensor:
    """The k-th smallest value (1-based). On the CPU by NumPy's introselect, ~15x faster than
    torch.kthvalue on a LeNet-300-100's 266k scores (both give the exact order statistic)."""
    if g.device.type == "cpu":
        return torch.tensor(np.partition(g.numpy(), k - 1)[k - 1], dtype=g.dtype)
    return torch.kthvalue(g, k).values


def _check_no_nan(groups: Dict[str, Tensor]) -> None:
    # a sum is NaN when a score is (or when both infinities are there: then look closer)
    sums = torch.stack([g.sum() for g in groups.values()]).tolist()  # one sync for all layers
    suspect = [n for n, total in zip(groups, sums) if math.isnan(total)]
    bad = [n for n in suspect if bool(torch.isnan(groups[n]).any())]
    if bad:
        raise FloatingPointError(f"the criterion gave NaN scores for {', '.join(bad)}")


def _prune_lowest(g: Tensor, sizes: Optional[Tensor], n_weights: int) -> Tensor:
    """Bool per group, True = kept: removes the lowest-scored groups up to n_weights weights
    (`sizes`: weights per group, None for single weights).

    Groups at -inf (already pruned) are always removed, groups at +inf (reserved) never; ties
    are removed in position order (as a stable sort would).
    """
    if sizes is None:  # single weights: a k-th value instead of a full sort
        n_remove = n_weights
    else:
        order = torch.argsort(g, stable=True)
        removed_weights = torch.cumsum(sizes[order], 0)
        n_remove = int(torch.searchsorted(removed_weights, torch.tensor(
            n_weights, device=g.device, dtype=removed_weights.dtype), right=True))
    dead = torch.isneginf(g)
    n_dead, n_reserved = torch.stack([dead.sum(), torch.isposinf(g).sum()]).tolist()
    n_remove = min(max(n_remove, n_dead), g.numel() - n_reserved)
    if n_remove == 0:
        return torch.ones_like(g, dtype=torch.bool)
    if n_remove == n_dead:
        kth = torch.tensor(-math.inf, dtype=g.dtype, device=g.device)
    elif n_dead:  # among the live ones: a selection slows down on many equal values
        kth = kth_smallest(g[~dead], n_remove - n_dead)
    else:
        kth = kth_smallest(g, n_remove)
    keep = g > kth
    n_at_most = g.numel() - int(keep.count_nonzero())
    if n_at_most > n_remove:  # some groups tied at the k-th value stay: the last ones in position
        tied = (g == kth).nonzero().squeeze(1)
        keep[tied[len(tied) - (n_at_most - n_remove):]] = True
    return keep


def select_by_rank(scores: Dict[str, Tensor], masks: Masks, target: Target,
                   opts: SelectOptions = SelectOptions(),
                   granularity: Granularity = UNSTRUCTURED) -> Masks:
    """Masks with `target` of all groups (weights or units) removed, lowest scores first."""
    check_reachable(target, masks, opts, granularity)
    names = layers_in_scope(masks, opts, granularity)
    groups = {n: _prepared_group_scores(n, scores, masks, opts, granularity) for n in names}
    _check_no_nan(groups)
    sizes = {n: torch.full_like(groups[n], granularity.group_size(n, masks)) for n in names} \
        if granularity.structured else dict.fromkeys(names)

    def weight_count(n: str) -> float:
        return float(granularity.group_count(n, masks) * granularity.group_size(n, masks))

    keep: Dict[str, Tensor] = {}
    if granularity.local:  # N:M: every block of M keeps its best
        pruned = granularity.pruned_per_block(target)
        keep = {n: granularity.keep_in_blocks(groups[n], pruned) for n in names}
    elif opts.scope == "global":
        total_to_remove = round(target * granularity.total(masks))
        flat_keep = _prune_lowest(torch.cat([groups[n] for n in names]),
                                  torch.cat([sizes[n] for n in names]) if granularity.structured else None,
                                  total_to_remove)
        for n, part in zip(names, torch.split(flat_keep, [groups[n].numel() for n in names])):
            keep[n] = part
    elif opts.scope == "layer" and isinstance(target, dict):  # a sparsity per layer
        for n in names:
            keep[n] = _prune_lowest(groups[n], sizes[n], round(target[n] * weight_count(n)))
    elif opts.scope == "layer":
        total_to_remove = round(target * granularity.total(masks))
        per_layer = total_to_remove / sum(weight_count(n) for n in names)
        for n in names:
            keep[n] = _prune_lowest(groups[n], sizes[n], round(per_layer * weight_count(n)))
    elif opts.scope == "stage":
        for n in names:
            ratio = target if isinstance(target, (int, float)) else target[stage_of(n, granularity)]
            keep[n] = _prune_lowest(groups[n], sizes[n], round(ratio * weight_count(n)))
    else:
        raise ConfigError(f"criterion.scope={opts.scope!r} is not one of: global, layer, stage")
    return granularity.assemble(keep, masks)


def select_by_threshold(scores: Dict[str, Tensor], masks: Masks, thresholds: Dict[str, float],
                        opts: SelectOptions = SelectOptions(),
                        granularity: Granularity = UNSTRUCTURED) -> Masks:
    """Masks removing every group whose score is below its layer's threshold."""
    groups = {n: _prepared_group_scores(n, scores, masks, opts, granularity)
              for n in layers_in_scope(masks, opts, granularity)}
    _check_no_nan(groups)
    keep = {n: (g >= thresholds[n]) & ~torch.isneginf(g) for n, g in groups.items()}  # pruned stays pruned
    return granularity.assemble(keep, masks)


def prune_rows(scores: Tensor, mask: Tensor, fraction: float) -> Tensor:
    """A new mask with round(fraction · row length) removed from every output row, the lowest
    scores first (ties in position order); what was pruned before stays pruned."""
    rows = mask.reshape(mask.shape[0], -1)
    g = scores.detach().reshape(rows.shape).to(torch.promote_types(scores.dtype, torch.float32))
    g = torch.where(rows != 0, g, -math.inf)
    _check_no_nan({"scores": g})
    k = int(round(fraction * rows.shape[1]))
    keep = rows != 0
    if k:
        keep = keep.clone()
        keep.scatter_(1, torch.argsort(g, dim=1, stable=True)[:, :k], False)
    return keep.reshape(mask.shape).to(mask.dtype)
