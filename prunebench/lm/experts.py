"""Removing whole experts of a mixture of experts (granularity=experts), top to bottom:

    for each decoder block on the device, on the dense model's calibration hidden states (as
    REAP's observer): the router's logits and choices, and the experts' outputs where the
    criterion reads them → criterion.expert_stat / expert_scores → the lowest-scored
    round(sparsity · experts) experts of every MoE block chosen → the model with their router
    logits at −∞ computed on a calibration window → the experts removed (router rows, expert
    slices, the config's expert count) and the logits compared.

Every MoE block loses the same number of experts, so the checkpoint is the family's standard
config with fewer experts (num_local_experts / num_experts / n_routed_experts). Removing expert j's
router row (and its correction bias) leaves a router that never chooses j: for the routers this
supports (moe.ROUTERS) that is exactly the dense model whose router is told never to choose j
(moe.route), which the check compares against. A router that chooses among groups of experts
(DeepSeek-V3's n_group) loses the same number from every group, the lowest-scored of each, so that
its groups stay what they were.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..config import Config, ConfigError
from ..criteria import Criterion, Routed
from . import moe, structure
from .blockwise import block_outputs, catch_inputs, move_outside_blocks
from .hub import decoder_blocks


def experts_to_remove(sparsity: float, experts: int, top_k: int, groups: Optional[Tuple[int, int]] = None) -> int:
    """round(sparsity · experts), checked: at least one goes and top_k stay; for a router that
    chooses among groups (`groups`: (n_group, topk_group)), checked_for_groups too."""
    n = round(sparsity * experts)
    if n < 1:
        raise ConfigError(f"sparsity={sparsity:g} of {experts} experts rounds to no expert to remove: granularity="
                          f"experts removes whole experts (sparsity of at least {0.5 / experts:.3g})")
    if n >= experts:
        raise ConfigError(f"sparsity={sparsity:g} removes all {experts} experts of every MoE block: at least "
                          f"{top_k} (the router's top-k) must stay")
    if experts - n < top_k:
        raise ConfigError(f"sparsity={sparsity:g} leaves {experts - n} of {experts} experts, fewer than the "
                          f"{top_k} the router sends every token to (num_experts_per_tok): remove at most "
                          f"{experts - top_k} (sparsity <= {(experts - top_k + 0.49) / experts:.3g})")
    return n if groups is None else checked_for_groups(sparsity, n, experts, top_k, *groups)


def checked_for_groups(sparsity: float, n: int, experts: int, top_k: int, groups: int, topk_group: int) -> int:
    """A router that chooses among groups of experts (moe.ROUTERS grouped_sigmoid): every group
    loses as many, keeps the two it is scored by, and the groups a token may choose hold its top_k."""
    size = experts // groups
    if n % groups:
        raise ConfigError(f"sparsity={sparsity:g} removes {n} of {experts} experts, not the same number from each "
                          f"of the router's {groups} groups (n_group): choose a multiple of {groups} experts "
                          f"(sparsity k·{groups}/{experts})")
    left = size - n // groups
    if left < 2:
        raise ConfigError(f"sparsity={sparsity:g} leaves {left} expert(s) in each of the router's {groups} groups; "
                          f"it scores a group by its two best experts, so at least 2 must stay in each")
    if left * topk_group < top_k:
        raise ConfigError(f"sparsity={sparsity:g} leaves {left} experts in each group and a token chooses among "
                          f"{topk_group} group(s) (topk_group): fewer than the {top_k} experts it is sent to")
    return n


def check_plan(cfg: Config, hf_config) -> None:
    """Everything the model's config decides, before any weights load."""
    experts = moe.expert_count(hf_config)
    if experts is None:
        raise ConfigError(f"granularity=experts removes experts of a mixture of experts; {cfg.model.name} is a dense "
                          f"{hf_config.model_type} model (its config names no experts)")
    kind = moe.ROUTERS.get(hf_config.model_type)
    if kind is None:
        raise ConfigError(f"granularity=experts: {hf_config.model_type}'s router is not one whose experts prunebench "
                          f"removes exactly (those of {', '.join(moe.ROUTERS)})")
    groups = (int(hf_config.n_group or 1), int(hf_config.topk_group or 1)) if kind == "grouped_sigmoid" else None
    experts_to_remove(cfg.sparsity, experts, int(hf_config.num_experts_per_tok), groups)


def prune_experts(model: nn.Module, criterion: Criterion, cfg: Config, calibration: Tensor,
                  device: torch.device, between_blocks=lambda: None) -> Dict:
    """Removes the lowest-scored experts of every MoE block in place; the figures the run records."""
    stacks = moe.expert_stacks(model)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    if not criterion.calibrates:  # random: no data
        scores = {s.block: criterion.expert_scores(None, s.count, generator).double() for s in stacks}
    else:
        scores = {}
        for stack, batches in observe(model, stacks, calibration, cfg.calibration.batch_size, device,
                                      between_blocks):
            stat = criterion.expert_stat(stack.count)
            for routed in batches:
                stat(routed)
            scores[stack.block] = criterion.expert_scores(stat, stack.count, generator).double().cpu()
    dense = {s.block: s.count for s in stacks}
    kept = {}
    for stack in stacks:
        groups = moe.routing_groups(stack.router)
        stay = stack.count - experts_to_remove(cfg.sparsity, stack.count, stack.top_k, groups)
        kept[stack.block] = best(scores[stack.block], stay, groups[0] if groups else 1)
    difference = remove_checked(model, stacks, kept, calibration, device)
    removed = sum(dense[b] - len(k) for b, k in kept.items())
    return {"experts_kept": {b: (dense[b], k) for b, k in kept.items()},
            "experts_removed": {b: [e for e in range(dense[b]) if e not in k] for b, k in kept.items()},
            "expert_scores": {b: s.tolist() for b, s in scores.items()},
            "units_removed": removed / sum(dense.values()), "check_max_abs_difference": difference}


def best(scores: Tensor, stay: int, groups: int = 1) -> List[int]:
    """The `stay` highest-scored experts (ties: the lower index), as many from each of the router's
    `groups` groups (contiguous, as DeepSeek-V3's), sorted."""
    size = scores.numel() // groups
    kept = [g * size + i for g in range(groups)
            for i in scores[g * size:(g + 1) * size].argsort(descending=True, stable=True)[:stay // groups].tolist()]
    return sorted(kept)


def observe(model: nn.Module, stacks: List[moe.ExpertStack], calibration: Tensor, batch_size: int,
            device: torch.device, between_blocks):
    """(stack, [each calibration batch's Routed at the block]) for every MoE block, one decoder
    block on the device at a time, on the dense model's hidden states."""
    _, blocks = decoder_blocks(model)
    by_block = {s.block: s for s in stacks}
    move_outside_blocks(model, blocks, device)
    inputs = catch_inputs(model, blocks, calibration, batch_size, device)
    for index, block in enumerate(blocks):
        block.to(device)
        stack = by_block.get(index)
        if stack is None:
            outputs = block_outputs(block, inputs)
        else:
            seen: List[Routed] = []
            with watching(stack, seen):
                outputs = block_outputs(block, inputs)
            yield stack, seen
        block.to("cpu")
        inputs = outputs
        between_blocks()
    move_outside_blocks(model, blocks, torch.device("cpu"))


@contextmanager
def watching(stack: moe.ExpertStack, seen: List[Routed]):
    """Each call of the block's experts as a Routed in `seen` (the router's logits caught just before)."""
    logits: List[Tensor] = []

    def router_hook(module, args, output):
        logits.append((output[0] if isinstance(output, (tuple, list)) else output).detach())

    def experts_hook(module, args):
        tokens, index, weights = moe.routed_args(args)
        scores = moe.gate_scores(stack.router, logits.pop().reshape(tokens.shape[0], -1))
        seen.append(Routed(tokens, scores, index, weights,
                           lambda rows, e: stack.output(rows, e), stack.count))

    handles = [stack.router.register_forward_hook(router_hook), stack.experts.register_forward_pre_hook(experts_hook)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------ removal
def remove_checked(model: nn.Module, stacks: List[moe.ExpertStack], kept: Dict[int, List[int]],
                   calibration: Optional[Tensor], device: torch.device) -> float:
    """Removes every block's experts but `kept`, and checks on one window that the smaller model
    computes what the dense one does with the removed experts' router logits at −∞."""
    ids = structure.check_window(model, calibration)
    with masked_routers(stacks, kept):
        before = structure.logits(model, ids, device)
    dense = stacks[0].count
    for stack in stacks:
        keep_experts(stack, kept[stack.block])
    left = len(kept[stacks[0].block])  # the same in every block
    for module in [model.config, *model.modules()]:  # the config's count, and every module's copy of it
        for attribute in moe.EXPERT_COUNT_KEYS:
            if getattr(module, attribute, None) == dense and not isinstance(getattr(type(module), attribute, None),
                                                                            property):
                setattr(module, attribute, left)
    after = structure.logits(model, ids, device)
    difference = float((after - before).abs().max())
    tolerance = (1e-4 if after.dtype == torch.float32 else 3e-2) * max(1.0, float(before.abs().max()))
    if difference > tolerance:
        raise RuntimeError(f"the model with the experts removed computes something else than the dense model with "
                           f"their router logits at -inf (largest |Δ logit| {difference:.3g}): a bug in "
                           f"lm/experts.py, please report it")
    return difference


@contextmanager
def masked_routers(stacks: List[moe.ExpertStack], kept: Dict[int, List[int]]):
    """While inside, each router chooses as its family does (moe.route) but never the experts not kept."""
    def hook_of(stack: moe.ExpertStack):
        gone = torch.ones(stack.count, dtype=torch.bool)
        gone[kept[stack.block]] = False

        def hook(module, args, output):
            logits = output[0]
            weights, index = moe.route(module, logits, stack.top_k, gone.to(logits.device))
            return (logits, weights.to(output[1].dtype), index)

        return hook

    handles = [s.router.register_forward_hook(hook_of(s)) for s in stacks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def keep_experts(stack: moe.ExpertStack, kept: List[int]) -> None:
    """Only the `kept` experts stay: their router rows (and router biases), their slices of every
    fused expert parameter (the expert counts: remove_checked)."""
    index = torch.tensor(kept, dtype=torch.long)
    count = stack.count
    for module in (stack.router, stack.experts):
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dim() >= 1 and p.shape[0] == count:
                setattr(module, name, nn.Parameter(p.data.index_select(0, index.to(p.device)).clone(),
                                                   requires_grad=p.requires_grad))
        for name, b in list(module.named_buffers(recurse=False)):
            if b.dim() >= 1 and b.shape[0] == count:
                module._buffers[name] = b.index_select(0, index.to(b.device)).clone()
