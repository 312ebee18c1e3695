"""Mixtures of experts as transformers 5 stores them (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
DeepSeek-V3, GLM-4.5, ...).

An MoE block's MLP is a router (`mlp.gate`: a weight (experts, hidden), not an nn.Linear) and an
experts module (`mlp.experts`) whose weights are fused 3-D parameters: `gate_up_proj` (E, 2·I, H)
or `up_proj` (E, I, H), and `down_proj` (E, H, I): slice e is expert e's Linear weight (outputs,
inputs), transposed where the module says `is_transposed`. The experts module is called with the
block's tokens (T, H), each token's top-k experts (T, k) and their weights (T, k).

Here: finding the stacks; each expert's matrices as layers (an `ExpertTap` gives a layer-wise
criterion the rows the router sends to that expert); counting where the router sends tokens; each
expert's sparsity; how each family's router turns its logits into a token's experts and weights.
(Removing whole experts: lm/experts.py.)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError
from ..core.layerwise import Tap
from .hub import block_linears, decoder_blocks, is_expert_module

# the config keys that hold the routed-expert count, by family (transformers maps some onto others)
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
# How each family's router chooses a token's experts from its logits (see `route`):
#   softmax: the top-k of a softmax over the experts, renormalised over the chosen where the
#     family says (Mixtral always; Qwen-MoE and OLMoE when norm_topk_prob);
#   grouped_sigmoid: DeepSeek-V3's: sigmoid affinities; the top-k by affinity + e_score_correction_bias
#     among the experts of the topk_group groups (of n_group, contiguous) whose two best sum highest;
#     the chosen affinities renormalised where norm_topk_prob, times routed_scaling_factor.
# For both, the model without expert j is the model whose router never chooses j (lm/experts.py).
ROUTERS = {"mixtral": "softmax", "qwen2_moe": "softmax", "qwen3_moe": "softmax", "olmoe": "softmax",
           "deepseek_v3": "grouped_sigmoid", "glm4_moe": "grouped_sigmoid"}
UP_NAMES = ("gate_up_proj", "up_proj")  # the first matrix of an expert (gated: gate and up fused)


@dataclass
class ExpertStack:
    """One decoder block's routed experts."""

    block: int  # the decoder block's index
    prefix: str  # the experts module's name and a dot: "model.layers.3.mlp.experts."
    moe: nn.Module  # the sparse MLP holding router and experts
    router: nn.Module
    experts: nn.Module

    @property
    def count(self) -> int:
        return int(self.experts.num_experts)

    @property
    def top_k(self) -> int:
        """The experts the router sends each token to."""
        return int(getattr(self.router, "top_k", None) or getattr(self.moe, "top_k", None))

    @property
    def up_name(self) -> str:
        return next(n for n in UP_NAMES if isinstance(getattr(self.experts, n, None), nn.Parameter))

    def matrix_names(self) -> List[str]:
        """The fused parameters (full names) in the order a token goes through them."""
        return [self.prefix + self.up_name, self.prefix + "down_proj"]

    def parts(self, param: str) -> Tuple[str, ...]:
        """The layers one expert's slice of `param` holds: a fused gate_up_proj is two (Mixtral's
        w1 and w3, Qwen's gate_proj and up_proj: separate Linear layers of the same input), others one."""
        gated = param == "gate_up_proj" and getattr(self.experts, "has_gate", True)
        return ("gate", "up") if gated else ("",)

    def view(self, slice_: Tensor, part: str = "") -> Tensor:
        """An expert's slice of a fused parameter (or of its mask) as the layer `part`'s weight
        (outputs, inputs): transposed where the module stores it so, the gate or up rows of a fused
        gate_up (halves, or alternate rows where the module interleaves them). A view."""
        w = slice_.t() if getattr(self.experts, "is_transposed", False) else slice_
        if not part:
            return w
        if getattr(self.experts, "is_concatenated", True):
            half = w.shape[0] // 2
            return w[:half] if part == "gate" else w[half:]
        return w[0::2] if part == "gate" else w[1::2]

    def matrix(self, param: str, expert: int, part: str = "") -> Tensor:
        """Expert `expert`'s weight of `param` ("gate_up_proj", "down_proj", ...), or of one of its
        parts, as (outputs, inputs), a view: writing into it writes the model's parameter."""
        return self.view(getattr(self.experts, param).data[expert], part)

    def up_out(self, rows: Tensor, expert: int) -> Tensor:
        """What expert `expert` hands its down projection for input rows (tokens, H)."""
        e = self.experts
        out = F.linear(rows, self.matrix(self.up_name, expert))
        bias = getattr(e, f"{self.up_name}_bias", None)
        if bias is not None:
            out = out + bias[expert]
        return e._apply_gate(out) if getattr(e, "has_gate", self.up_name == "gate_up_proj") else e.act_fn(out)

    def output(self, rows: Tensor, expert: int) -> Tensor:
        """Expert `expert`'s output for input rows (before the router's weight)."""
        e = self.experts
        out = F.linear(self.up_out(rows, expert), self.matrix("down_proj", expert))
        bias = getattr(e, "down_proj_bias", None)
        out = out if bias is None else out + bias[expert]
        return e.post_expert_norm(out) if getattr(e, "has_post_expert_norm", False) else out


def routed_args(args) -> tuple:
    """(tokens (T, H), top-k expert indices (T, k), their weights (T, k)) from an experts call."""
    if len(args) < 3:
        raise ConfigError("an MoE experts module was called without its routing as positional arguments "
                          "(hidden_states, top_k_index, top_k_weights): this transformers version's MoE layout "
                          "is not one prunebench reads")
    hidden, index, weights = args[:3]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return hidden, index.reshape(hidden.shape[0], -1), weights.reshape(hidden.shape[0], -1)


# ------------------------------------------------------------------------------ routers
def router_kind(router: nn.Module) -> str:
    """The ROUTERS kind of a router module: grouped_sigmoid where it holds DeepSeek-V3's correction
    bias and groups, else softmax."""
    grouped = hasattr(router, "e_score_correction_bias") and hasattr(router, "num_group")
    return "grouped_sigmoid" if grouped else "softmax"


def gate_scores(router: nn.Module, logits: Tensor) -> Tensor:
    """(T, E) float32: each token's gate score of every expert before the top-k: its softmax
    probability, or its sigmoid affinity (grouped_sigmoid)."""
    logits = logits.float()
    return torch.sigmoid(logits) if router_kind(router) == "grouped_sigmoid" else torch.softmax(logits, dim=-1)


def route(router: nn.Module, logits: Tensor, top_k: int, gone: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(weights (T, k), expert indices (T, k)): what the router gives each token from its logits
    (T, E), as its family computes it (ROUTERS); the experts `gone` (bool (E,)) are never chosen,
    which is what the router of the model without them computes."""
    if router_kind(router) == "softmax":
        logits = logits.float() if gone is None else logits.float().masked_fill(gone, float("-inf"))
        weights, index = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
        if getattr(router, "norm_topk_prob", True):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, index
    scores = gate_scores(router, logits)
    choice = scores + router.e_score_correction_bias
    choice = choice if gone is None else choice.masked_fill(gone, float("-inf"))
    groups = choice.view(choice.shape[0], router.num_group, -1)
    best = groups.topk(2, dim=-1).values.sum(dim=-1)  # a group's score: its two best experts
    chosen = torch.zeros_like(best, dtype=torch.bool).scatter_(1, best.topk(router.topk_group, dim=-1).indices, True)
    choice = choice.masked_fill(~chosen.repeat_interleave(groups.shape[2], dim=1), float("-inf"))
    index = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, index)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * router.routed_scaling_factor, index


def routing_groups(router: nn.Module) -> Optional[Tuple[int, int]]:
    """(groups, groups each token may choose from) of a grouped_sigmoid router; None for a softmax one."""
    if router_kind(router) == "softmax":
        return None
    return int(router.num_group), int(router.topk_group)


def expert_stacks(model: nn.Module) -> List[ExpertStack]:
    """Every decoder block's routed experts (a dense block, as Qwen2-MoE's mlp_only_layers, has none)."""
    prefix, blocks = decoder_blocks(model)
    return [s for i, block in enumerate(blocks) for s in expert_stacks_of_block(block, f"{prefix}.{i}.")]


def expert_stacks_of_block(block: nn.Module, here: str) -> List[ExpertStack]:
    """The routed experts in one decoder block whose parameters are named `here` + ..."""
    index = int(here.rstrip(".").rpartition(".")[2])
    stacks = []
    for name, module in block.named_modules():
        if is_expert_module(module):
            moe = router = None
            parent = name
            while router is None and parent:  # the nearest module holding a router beside the experts
                parent = parent.rpartition(".")[0]
                moe = block.get_submodule(parent) if parent else block
                router = getattr(moe, "gate", None) or getattr(moe, "router", None)
            if router is None or getattr(router, "weight", None) is None:
                raise ConfigError(f"{here}{name} holds experts but no router weight (mlp.gate.weight) beside them "
                                  f"that prunebench can read")
            stacks.append(ExpertStack(index, f"{here}{name}.", moe, router, module))
    return stacks


# ------------------------------------------------------------------------------ experts as layers
class ExpertTap(Tap):
    """One expert's matrix as a layer: its input rows are those of the tokens the router sends to
    the expert (the up projection: the tokens themselves; down: what the expert's up projection
    and gate make of them, with the weights as they are now)."""

    def __init__(self, stack: ExpertStack, param: str, expert: int, part: str = ""):
        super().__init__(stack.experts, group=f"{stack.prefix}{param}")
        self.stack, self.param, self.expert, self.part = stack, param, expert, part

    def rows(self, args) -> Optional[Tensor]:
        hidden, index, _ = routed_args(args)
        routed = hidden[(index == self.expert).any(dim=-1)]
        if routed.shape[0] == 0:
            return None
        return routed if self.param != "down_proj" else self.stack.up_out(routed, self.expert)


def layer_name(param_name: str, expert: int, part: str = "") -> str:
    """"...experts.down_proj[3]", "...experts.gate_up_proj[3].gate"."""
    return f"{param_name}[{expert}]" + (f".{part}" if part else "")


def expert_layers(stack: ExpertStack, only: Optional[str] = None) -> Dict[str, ExpertTap]:
    """Every expert's layers (of the fused parameter `only`, when given) by name: all gate and up
    projections first, then all down projections (the experts of one fused parameter are
    parallel: none reads another's output)."""
    out = {}
    for full in stack.matrix_names() if only is None else [only]:
        param = full[len(stack.prefix):]
        for e in range(stack.count):
            for part in stack.parts(param):
                out[layer_name(full, e, part)] = ExpertTap(stack, param, e, part)
    return out


class Matrix(nn.Module):
    """One layer's weight as a module of its own, sharing the model's storage: a data-free
    criterion scores and prunes it as one layer (an expert's matrix inside a fused parameter)."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)


def layers_of(model: nn.Module, name: str, weight: Tensor, mask: Tensor) -> List[Tuple[Matrix, Tensor]]:
    """The layers a prunable weight holds, each as a Matrix with its mask: a Linear's weight is
    one; a fused expert parameter one per expert (two for a gate_up: gate and up)."""
    stack = stack_of(expert_stacks(model), name)
    if stack is None:
        return [(Matrix(weight.data), mask)]
    param = name[len(stack.prefix):]
    return [(Matrix(stack.matrix(param, e, part)), stack.view(mask[e], part))
            for e in range(stack.count) for part in stack.parts(param)]


def stack_of(stacks: List[ExpertStack], param_name: str) -> Optional[ExpertStack]:
    for stack in stacks:
        if param_name in stack.matrix_names():
            return stack
    return None


def expert_sparsities(model: nn.Module) -> Dict[str, List[float]]:
    """Per fused matrix, each expert's fraction of zero weights."""
    out = {}
    for stack in expert_stacks(model):
        for full in stack.matrix_names():
            w = getattr(stack.experts, full[len(stack.prefix):]).detach()
            out[full] = [float((w[e] == 0).sum()) / w[e].numel() for e in range(w.shape[0])]
    return out


# ------------------------------------------------------------------------------ routing counts
@contextmanager
def routing_counts(model: nn.Module, kept: Optional[Dict[int, Tuple[int, List[int]]]] = None
                   ) -> Iterator[Dict[str, List]]:
    """Counts, while inside, the (token, expert) choices of every MoE block's router: {"blocks":
    decoder block indices, "tokens": [tokens per expert] per MoE block}. `kept`: after expert
    removal, per decoder block the dense expert count and the experts kept (by their dense index),
    so that the counts stay by the dense model's experts (null for a removed one)."""
    stacks = expert_stacks(model)
    counts = {"blocks": [s.block for s in stacks], "tokens": [0] * len(stacks)}
    handles = []
    for i, stack in enumerate(stacks):
        def hook(module, args, i=i, count=stack.count):  # counted where the model runs: no sync per call
            _, index, _ = routed_args(args)
            counts["tokens"][i] = counts["tokens"][i] + torch.bincount(index.reshape(-1), minlength=count)[:count]
        handles.append(stack.experts.register_forward_pre_hook(hook))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()
        counts["tokens"] = [by_dense_index(c.tolist() if torch.is_tensor(c) else [0] * s.count, (kept or {}).get(b))
                            for c, b, s in zip(counts["tokens"], counts["blocks"], stacks)]


def by_dense_index(counts: List[int], kept: Optional[Tuple[int, List[int]]]) -> List[Optional[int]]:
    if kept is None:
        return counts
    dense, experts = kept
    out: List[Optional[int]] = [None] * dense
    for position, expert in enumerate(experts):
        out[expert] = counts[position]
    return out


def block_weights(model: nn.Module) -> Dict[str, Tensor]:
    """The prunable weights of the decoder blocks, by parameter name: the nn.Linear layers'
    (hub.block_linears) and a mixture of experts' fused expert weights (3-D: one matrix per
    expert), in the model's own order."""
    linears = block_linears(model)
    params = dict(model.named_parameters())
    experts = {n for stack in expert_stacks(model) for n in stack.matrix_names()}
    return {n: p for n, p in params.items() if n in linears or n in experts}


def has_experts(model: nn.Module) -> bool:
    return any(is_expert_module(m) for m in model.modules())


def expert_count(hf_config) -> Optional[int]:
    """The routed experts per MoE block the config names (None: a dense model)."""
    for key in EXPERT_COUNT_KEYS:
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
