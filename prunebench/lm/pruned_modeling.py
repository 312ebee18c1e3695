"""Causal LMs whose decoder blocks differ in size: what a checkpoint of a non-uniformly pruned model
loads with (`trust_remote_code=True`).

prunebench copies this file beside such a checkpoint as `modeling_pruned.py`, so it imports only torch
and transformers, never prunebench. Its config names the family's own model type and adds
`pruned_blocks`, one dict of sizes per block; each class below builds the family's model and then
gives every block the projections those sizes name before the weights load. prunebench's in-memory
removal (prunebench/lm/structure.py) updates the modules' attributes through the same functions, so
the rule of what an attention's forward reads has one owner.
"""

from typing import Dict, List, Tuple

from torch import nn
from transformers import (LlamaForCausalLM, MistralForCausalLM, OPTForCausalLM, Qwen2ForCausalLM,
                          Qwen3ForCausalLM)

# model_type -> family: the families share module names, and so one removal rule
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "opt": "opt"}
# family -> names (inside the attention module) of the q, k, v and output projections
ATTENTION = {"llama": ("q_proj", "k_proj", "v_proj", "o_proj"), "opt": ("q_proj", "k_proj", "v_proj", "out_proj")}
# family -> (MLP module inside the block, "" for the block itself; its writers; its reader)
MLP = {"llama": ("mlp", ("gate_proj", "up_proj"), "down_proj"), "opt": ("", ("fc1",), "fc2")}


def block_stack(model: nn.Module, family: str) -> nn.ModuleList:
    """The decoder blocks of a family's ForCausalLM."""
    return model.model.decoder.layers if family == "opt" else model.model.layers


def mlp_module(block: nn.Module, family: str) -> nn.Module:
    name = MLP[family][0]
    return getattr(block, name) if name else block


def set_attention_counts(attention: nn.Module, heads: int, kv_heads: int) -> None:
    """The head counts an attention module's forward reads: LLaMA-likes repeat each KV head
    `num_key_value_groups` times, OPT views its projections as `num_heads` heads."""
    if hasattr(attention, "num_key_value_groups"):
        attention.num_key_value_groups = heads // kv_heads
    if hasattr(attention, "num_heads"):
        attention.num_heads = heads
    for name, value in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if hasattr(attention, name):  # older releases keep these on the module too
            setattr(attention, name, value)


def set_mlp_channels(mlp: nn.Module, channels: int) -> None:
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = channels


def _linear_like(old: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """An empty Linear of the new shape where the old one lives (meta while from_pretrained builds)."""
    return nn.Linear(in_features, out_features, bias=bias, device=old.weight.device, dtype=old.weight.dtype)


def projection_shapes(family: str, hidden: int, sizes: Dict) -> Dict[str, Tuple[int, int]]:
    """Block-relative name -> (in_features, out_features) of each projection for `sizes`."""
    q, k, v, o = (f"self_attn.{name}" for name in ATTENTION[family])
    attn_width, kv_width = sizes["heads"] * sizes["head_dim"], sizes["kv_heads"] * sizes["head_dim"]
    shapes = {q: (hidden, attn_width), k: (hidden, kv_width), v: (hidden, kv_width), o: (attn_width, hidden)}
    prefix = MLP[family][0] + "." if MLP[family][0] else ""
    for writer in MLP[family][1]:
        shapes[prefix + writer] = (hidden, sizes["channels"])
    shapes[prefix + MLP[family][2]] = (sizes["channels"], hidden)
    return shapes


def resize_block(block: nn.Module, family: str, sizes: Dict) -> None:
    """Give the block the projections `sizes` names ({"heads", "kv_heads", "head_dim", "channels",
    "biases": block-relative names of the projections with a bias}), weights left for the checkpoint."""
    hidden = block.self_attn.q_proj.in_features
    for name, (fan_in, fan_out) in projection_shapes(family, hidden, sizes).items():
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        setattr(parent, child, _linear_like(getattr(parent, child), fan_in, fan_out, name in sizes["biases"]))
    set_attention_counts(block.self_attn, sizes["heads"], sizes["kv_heads"])
    set_mlp_channels(mlp_module(block, family), sizes["channels"])


def resize_to_config(model: nn.Module) -> None:
    """Resize every block to the config's `pruned_blocks` (nothing when it has none)."""
    blocks: List[Dict] = getattr(model.config, "pruned_blocks", None) or []
    family = FAMILIES[model.config.model_type]
    for block, sizes in zip(block_stack(model, family), blocks):
        resize_block(block, family, sizes)


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        resize_to_config(self)


class PrunedMistralForCausalLM(MistralForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        resize_to_config(self)


class PrunedQwen2ForCausalLM(Qwen2ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        resize_to_config(self)


class PrunedQwen3ForCausalLM(Qwen3ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        resize_to_config(self)


class PrunedOPTForCausalLM(OPTForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        resize_to_config(self)


# model_type -> (the family's standard class name, the class above that a checkpoint's auto_map names)
CLASSES = {"llama": ("LlamaForCausalLM", "PrunedLlamaForCausalLM"),
           "mistral": ("MistralForCausalLM", "PrunedMistralForCausalLM"),
           "qwen2": ("Qwen2ForCausalLM", "PrunedQwen2ForCausalLM"),
           "qwen3": ("Qwen3ForCausalLM", "PrunedQwen3ForCausalLM"),
           "opt": ("OPTForCausalLM", "PrunedOPTForCausalLM")}
