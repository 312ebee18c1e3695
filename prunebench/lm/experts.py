"""Removing whole experts of a mixture of experts (granularity=experts), top to bottom:

    for each decoder block on the device, on the dense model's calibration hidden states (as
    REAP's observer): the router's logits and choices, and the experts' outputs where the
    criterion reads them → criterion.expert_stat / expert_scores → the lowest-scored
    round(sparsity · experts) experts of every MoE block chosen → the model with their router
    logits at −∞ computed on a calibration window → the experts removed (router rows, expert
    slices, the config's expert count) and the logits compared.

Every MoE block loses the same number of experts, so the checkpoint is the family's standard
config with fewer experts (num_local_experts / num_experts). Removing expert j's router row makes
the router's softmax a softmax over the experts left, and top-k picks among them: for the routers
this supports (the top-k of a softmax, moe.SOFTMAX_ROUTERS) that is exactly the dense model with
j's logit at −∞, which the check compares against.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from ..config import Config, ConfigError
from ..criteria import Criterion, Routed
from . import moe, structure
from .blockwise import block_outputs, catch_inputs, move_outside_blocks
from .hub import decoder_blocks


def experts_to_remove(sparsity: float, experts: int, top_k: int) -> int:
    """round(sparsity · experts), checked: at least one goes, and top_k stay."""
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
    return n


def check_plan(cfg: Config, hf_config) -> None:
    """Everything the model's config decides, before any weights load."""
    experts = moe.expert_count(hf_config)
    if experts is None:
        raise ConfigError(f"granularity=experts removes experts of a mixture of experts; {cfg.model.name} is a dense "
                          f"{hf_config.model_type} model (its config names no experts)")
    if hf_config.model_type not in moe.SOFTMAX_ROUTERS:
        raise ConfigError(f"granularity=experts: {hf_config.model_type}'s router is not one whose experts prunebench "
                          f"removes exactly (the top-k of a softmax: {', '.join(moe.SOFTMAX_ROUTERS)})")
    experts_to_remove(cfg.sparsity, experts, int(hf_config.num_experts_per_tok))


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
        stay = stack.count - experts_to_remove(cfg.sparsity, stack.count, top_k(stack))
        kept[stack.block] = sorted(scores[stack.block].argsort(descending=True, stable=True)[:stay].tolist())
    difference = remove_checked(model, stacks, kept, calibration, device)
    removed = sum(dense[b] - len(k) for b, k in kept.items())
    return {"experts_kept": {b: (dense[b], k) for b, k in kept.items()},
            "experts_removed": {b: [e for e in range(dense[b]) if e not in k] for b, k in kept.items()},
            "expert_scores": {b: s.tolist() for b, s in scores.items()},
            "units_removed": removed / sum(dense.values()), "check_max_abs_difference": difference}


def top_k(stack: moe.ExpertStack) -> int:
    return int(getattr(stack.router, "top_k", None) or getattr(stack.moe, "top_k", None))


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
        seen.append(Routed(tokens, logits.pop().reshape(tokens.shape[0], -1), index, weights,
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
    """While inside, each router chooses as if the experts not kept had logit −∞: the softmax over
    the others, their top-k, renormalised over the top-k where the router does (Mixtral always;
    Qwen-MoE and OLMoE when norm_topk_prob)."""
    def hook_of(stack: moe.ExpertStack):
        gone = torch.ones(stack.count, dtype=torch.bool)
        gone[kept[stack.block]] = False

        def hook(module, args, output):
            logits = output[0].masked_fill(gone.to(output[0].device), float("-inf"))
            probs = torch.softmax(logits.float(), dim=-1)
            values, index = torch.topk(probs, top_k(stack), dim=-1)
            if getattr(module, "norm_topk_prob", True):
                values = values / values.sum(dim=-1, keepdim=True)
            return (logits, values.to(output[1].dtype), index)

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
