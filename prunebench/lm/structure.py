"""Physical removal of structures (attention heads, MLP channels, whole decoder blocks) from Hugging
Face causal LMs, and checkpoints of the result that `from_pretrained` loads.

Two families: LLaMA-like (llama, mistral, qwen2, qwen3: grouped-query attention q/k/v/o_proj and a
gated MLP gate/up/down_proj) and OPT (q/k/v/out_proj, fc1/fc2). The scoring flow decides what to keep;
these functions only cut. `zero_heads`/`zero_channels` compute the masked model that removal must
equal exactly (a dropped unit's output columns set to 0).

Checkpoints (`save`): a model whose blocks all have the same sizes saves as a standard config of its
own family. Otherwise (different sizes per block, or OPT heads, whose width its config ties to
hidden_size, or biases its config cannot switch on) it saves either with `modeling_pruned.py` beside
the weights (remote code) or padded with zero units up to a standard config.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..config import ConfigError
from . import pruned_modeling
from .hub import decoder_blocks
from .pruned_modeling import ATTENTION, CLASSES, FAMILIES, MLP, mlp_module, set_attention_counts, set_mlp_channels

NONUNIFORM = ("remote_code", "pad")


@dataclass
class AttentionParts:
    module: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head: query head h reads KV group h // group_size."""
        return self.heads // self.kv_heads


@dataclass
class MLPParts:
    module: nn.Module
    writers: List[nn.Linear]  # channel c is row c of each writer ...
    reader: nn.Linear  # ... and column c of the reader
    channels: int


@dataclass
class BlockParts:
    index: int
    block: nn.Module
    attention: AttentionParts
    mlp: MLPParts


# ------------------------------------------------------------------------------ family and sizes
def family(model_or_hf_config) -> str:
    """"llama" or "opt": which removal rule the model (or its config, before weights load) follows."""
    config = getattr(model_or_hf_config, "config", model_or_hf_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ConfigError(f"cannot remove structures from a {model_type or type(config).__name__} model: the "
                          f"supported families are LLaMA-like (llama, mistral, qwen2, qwen3) and OPT (opt)")
    return FAMILIES[model_type]


def sizes(hf_config) -> Dict:
    """The model's sizes from its config alone (for checks before loading). A checkpoint saved with
    per-block sizes (remote code) also gives them under "blocks"."""
    c = hf_config
    heads, hidden = c.num_attention_heads, c.hidden_size
    if family(c) == "opt":
        out = dict(layers=c.num_hidden_layers, heads=heads, kv_heads=heads, head_dim=hidden // heads,
                   channels=c.ffn_dim, hidden=hidden)
    else:
        out = dict(layers=c.num_hidden_layers, heads=heads, kv_heads=c.num_key_value_heads or heads,
                   head_dim=getattr(c, "head_dim", None) or hidden // heads, channels=c.intermediate_size,
                   hidden=hidden)
    if getattr(c, "pruned_blocks", None):
        out["blocks"] = copy.deepcopy(c.pruned_blocks)
    return out


def _block_parts(index: int, block: nn.Module, fam: str) -> BlockParts:
    attn = block.self_attn
    q, k, v, o = (getattr(attn, name) for name in ATTENTION[fam])
    head_dim = attn.head_dim
    attention = AttentionParts(attn, q, k, v, o, q.out_features // head_dim, k.out_features // head_dim, head_dim)
    module = mlp_module(block, fam)
    _, writers, reader = MLP[fam]
    mlp = MLPParts(module, [getattr(module, w) for w in writers], getattr(module, reader),
                   getattr(module, reader).in_features)
    return BlockParts(index, block, attention, mlp)


def layout(model: nn.Module) -> List[BlockParts]:
    """Every block's parts, with the sizes its modules have now (after removals too)."""
    fam = family(model)
    _, blocks = decoder_blocks(model)
    return [_block_parts(i, block, fam) for i, block in enumerate(blocks)]


def block_sizes(model: nn.Module) -> List[Dict]:
    """Per block: query heads, KV heads, MLP channels and parameters, as they are now."""
    return [dict(heads=p.attention.heads, kv_heads=p.attention.kv_heads, channels=p.mlp.channels,
                 params=sum(t.numel() for t in p.block.parameters())) for p in layout(model)]


# ------------------------------------------------------------------------------ slicing helpers
def _gather_units(t: Tensor, dim: int, sources: Sequence[int], width: int) -> Tensor:
    """Along `dim`, unit i (of `width` elements) of the result is unit sources[i] of t, or zeros
    where sources[i] is -1 (padding)."""
    shape = list(t.shape)
    shape[dim] = len(sources) * width
    out = t.new_zeros(shape)
    kept = [i for i, s in enumerate(sources) if s >= 0]
    if kept:
        offsets = torch.arange(width, device=t.device)
        dst = (torch.tensor(kept, device=t.device)[:, None] * width + offsets).flatten()
        src = (torch.tensor([sources[i] for i in kept], device=t.device)[:, None] * width + offsets).flatten()
        out.index_copy_(dim, dst, t.index_select(dim, src))
    return out


Units = Tuple[Sequence[int], int]  # (sources, width), as _gather_units takes them


def _resliced(linear: nn.Linear, rows: Optional[Units] = None, cols: Optional[Units] = None):
    """(weight, bias) of `linear` with its output rows and/or input columns regathered."""
    weight, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
    if rows is not None:
        weight = _gather_units(weight, 0, *rows)
        bias = None if bias is None else _gather_units(bias, 0, *rows)
    if cols is not None:
        weight = _gather_units(weight, 1, *cols)
    return weight, bias


def _assign(linear: nn.Linear, weight: Tensor, bias: Optional[Tensor]) -> None:
    grad = linear.weight.requires_grad
    linear.weight = nn.Parameter(weight, requires_grad=grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=grad)
    linear.out_features, linear.in_features = weight.shape


def _new_linear(weight: Tensor, bias: Optional[Tensor]) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    _assign(linear, weight, bias)
    return linear


def _check_mask(keep: Tensor, count: int, what: str) -> None:
    if keep.dtype != torch.bool or tuple(keep.shape) != (count,):
        raise ValueError(f"keep must be a bool tensor of shape ({count},) over the {what}, got {keep.dtype} "
                         f"{tuple(keep.shape)}")


def _check_keep(keep: Tensor, count: int, what: str) -> List[int]:
    """The kept indices of a bool mask over `count` units; at least one must stay."""
    _check_mask(keep, count, what)
    kept = keep.nonzero().flatten().tolist()
    if not kept:
        raise ValueError(f"keeping none of the {count} {what}: at least one must stay")
    return kept


# ------------------------------------------------------------------------------ masks and removal
@torch.no_grad()
def zero_heads(parts: BlockParts, keep: Tensor) -> None:
    """The masked model: the output-projection columns of dropped query heads set to 0."""
    a = parts.attention
    _check_mask(keep, a.heads, "query heads")
    keep = keep.to(a.o.weight.device)
    column_keep = keep.repeat_interleave(a.head_dim)
    a.o.weight.mul_(column_keep.to(a.o.weight.dtype))


@torch.no_grad()
def zero_channels(parts: BlockParts, keep: Tensor) -> None:
    reader = parts.mlp.reader
    _check_mask(keep, parts.mlp.channels, "MLP channels")
    reader.weight.mul_(keep.to(device=reader.weight.device, dtype=reader.weight.dtype))


def _checked_groups(a: AttentionParts, kept: List[int]) -> List[int]:
    """The KV groups that keep query heads, after checking each keeps the same number."""
    counts = [0] * a.kv_heads
    for h in kept:
        counts[h // a.group_size] += 1
    if len({c for c in counts if c}) > 1:
        raise ValueError(f"the KV groups that stay must keep the same number of query heads each, got {counts} "
                         f"query heads kept per group (of {a.group_size})")
    return [g for g, c in enumerate(counts) if c]


@torch.no_grad()
def keep_heads(parts: BlockParts, keep: Tensor) -> None:
    """Remove the dropped query heads (q rows, o columns); a KV group left without query heads goes
    with its k/v rows. Updates the attention's head counts so its forward works."""
    a = parts.attention
    kept = _check_keep(keep, a.heads, "query heads")
    groups = _checked_groups(a, kept)
    _assign(a.q, *_resliced(a.q, rows=(kept, a.head_dim)))
    _assign(a.k, *_resliced(a.k, rows=(groups, a.head_dim)))
    _assign(a.v, *_resliced(a.v, rows=(groups, a.head_dim)))
    _assign(a.o, *_resliced(a.o, cols=(kept, a.head_dim)))
    set_attention_counts(a.module, len(kept), len(groups))
    a.heads, a.kv_heads = len(kept), len(groups)


@torch.no_grad()
def keep_channels(parts: BlockParts, keep: Tensor) -> None:
    """Remove the dropped MLP channels (writer rows and biases, reader columns)."""
    m = parts.mlp
    kept = _check_keep(keep, m.channels, "MLP channels")
    for writer in m.writers:
        _assign(writer, *_resliced(writer, rows=(kept, 1)))
    _assign(m.reader, *_resliced(m.reader, cols=(kept, 1)))
    set_mlp_channels(m.module, len(kept))
    m.channels = len(kept)


@torch.no_grad()
def add_to_output_bias(linear: nn.Linear, delta: Tensor) -> None:
    """bias += delta, creating a zero bias first where the layer has none (FLAP's compensation)."""
    if linear.bias is None:
        w = linear.weight
        linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                   requires_grad=w.requires_grad)
    linear.bias.add_(delta.to(device=linear.bias.device, dtype=linear.bias.dtype))


# config attributes with one entry per decoder block
PER_LAYER_KEYS = ("layer_types",)


def remove_blocks(model: nn.Module, drop: Sequence[int]) -> None:
    """Drop whole decoder blocks; the rest are renumbered (their KV-cache slots, the config's layer
    count and per-layer lists)."""
    _, blocks = decoder_blocks(model)
    count, drop = len(blocks), sorted({int(i) for i in drop})
    if any(i < 0 or i >= count for i in drop):
        raise ValueError(f"block indices {drop} are not all in [0, {count})")
    if len(drop) == count:
        raise ValueError(f"removing all {count} decoder blocks: at least one must stay")
    for i in reversed(drop):
        del blocks[i]
    for index, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index
    config = model.config
    for key in PER_LAYER_KEYS:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == count:
            setattr(config, key, [v for i, v in enumerate(values) if i not in drop])
    config.num_hidden_layers = len(blocks)
    for module in model.modules():  # computed once at init (Qwen2/Qwen3)
        if hasattr(module, "has_sliding_layers") and getattr(config, "layer_types", None) is not None:
            module.has_sliding_layers = "sliding_attention" in config.layer_types


# ------------------------------------------------------------------------------ checkpoints
# model_type -> {config flag: the block-relative projections it gives biases}
_ATT = tuple(f"self_attn.{n}" for n in ATTENTION["llama"])
BIAS_FLAGS = {"llama": {"attention_bias": _ATT, "mlp_bias": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
              "mistral": {}, "qwen2": {}, "qwen3": {"attention_bias": _ATT},
              "opt": {"enable_bias": tuple(f"self_attn.{n}" for n in ATTENTION["opt"]) + ("fc1", "fc2")}}
# model_type -> projections whose biases its modeling always builds
FIXED_BIASES = {"qwen2": _ATT[:3]}


def _shape(parts: BlockParts) -> Dict:
    """A block's sizes as a checkpoint's config records them (pruned_modeling.resize_block's input)."""
    biases = sorted(name for name, m in parts.block.named_modules() if isinstance(m, nn.Linear) and m.bias is not None)
    a = parts.attention
    return dict(heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim, channels=parts.mlp.channels, biases=biases)


def _bias_plan(model_type: str, shapes: List[Dict]) -> Optional[Tuple[Dict[str, bool], set]]:
    """(config flags, projections every block must have a bias on) for a standard config, or None
    when some bias has no flag that builds it."""
    present = {name for s in shapes for name in s["biases"]}
    flags = {flag: bool(present & set(names)) for flag, names in BIAS_FLAGS[model_type].items()}
    required = set(FIXED_BIASES.get(model_type, ()))
    for flag, names in BIAS_FLAGS[model_type].items():
        if flags[flag]:
            required |= set(names)
    return (flags, required) if present <= required else None


def _standard_possible(fam: str, hidden: int, shapes: List[Dict]) -> bool:
    uniform = len({(s["heads"], s["kv_heads"], s["channels"]) for s in shapes}) == 1
    full_opt_heads = fam != "opt" or shapes[0]["heads"] * shapes[0]["head_dim"] == hidden
    return uniform and full_opt_heads


class _Edits:
    """Attribute changes undone on exit: saving leaves the caller's model as it was handed over."""

    def __init__(self):
        self.undo = []

    def set(self, obj, name: str, value) -> None:
        self.undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for obj, name, old in reversed(self.undo):
            setattr(obj, name, old)


def _fill_biases(parts: List[BlockParts], required: set, edits: _Edits) -> None:
    """Zero biases where a standard config's flag builds one and the block has none."""
    for p in parts:
        for name in required:
            linear = p.block.get_submodule(name)
            if linear.bias is None:
                w = linear.weight
                edits.set(linear, "bias", nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)))


def _pad_block(fam: str, p: BlockParts, heads: int, kv_heads: int, channels: int, edits: _Edits) -> None:
    """Swap in copies of the block's projections padded with zero units: a zero query head after each
    group's own, zero KV groups after the block's own, zero channels after its own (they add 0)."""
    a, group = p.attention, heads // kv_heads
    head_src = [j * a.group_size + i if j < a.kv_heads and i < a.group_size else -1
                for j in range(kv_heads) for i in range(group)]
    group_src = [j if j < a.kv_heads else -1 for j in range(kv_heads)]
    q, k, v, o = ATTENTION[fam]
    cuts = {q: dict(rows=(head_src, a.head_dim)), k: dict(rows=(group_src, a.head_dim)),
            v: dict(rows=(group_src, a.head_dim)), o: dict(cols=(head_src, a.head_dim))}
    for name, cut in cuts.items():
        edits.set(a.module, name, _new_linear(*_resliced(getattr(a.module, name), **cut)))
    channel_src = list(range(p.mlp.channels)) + [-1] * (channels - p.mlp.channels)
    _, writers, reader = MLP[fam]
    for name in writers:
        edits.set(p.mlp.module, name, _new_linear(*_resliced(getattr(p.mlp.module, name), rows=(channel_src, 1))))
    edits.set(p.mlp.module, reader, _new_linear(*_resliced(getattr(p.mlp.module, reader), cols=(channel_src, 1))))


def _pad(fam: str, hidden: int, parts: List[BlockParts], shapes: List[Dict], edits: _Edits) -> Dict:
    """Pad every block up to the largest (OPT: to all heads, which its config ties to hidden_size);
    the padded sizes."""
    head_dim, channels = shapes[0]["head_dim"], max(s["channels"] for s in shapes)
    if fam == "opt":
        heads = kv_heads = hidden // head_dim
    else:
        kv_heads = max(s["kv_heads"] for s in shapes)
        heads = kv_heads * max(s["heads"] // s["kv_heads"] for s in shapes)
    for p in parts:
        _pad_block(fam, p, heads, kv_heads, channels, edits)
    return dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, channels=channels)


def _forget(config, *keys: str) -> None:
    for key in keys:
        config.__dict__.pop(key, None)


def _standard_config(config, shape: Dict, flags: Dict[str, bool]) -> None:
    """The family's own config for blocks of one shape: loads without prunebench."""
    if family(config) == "opt":
        config.ffn_dim = shape["channels"]
    else:
        config.num_attention_heads, config.num_key_value_heads = shape["heads"], shape["kv_heads"]
        config.head_dim = shape["head_dim"]  # explicit: LLaMA would compute hidden_size // heads
        config.intermediate_size = shape["channels"]
    for flag, value in flags.items():
        setattr(config, flag, value)
    _forget(config, "pruned_blocks", "auto_map")
    config.architectures = [CLASSES[config.model_type][0]]


def _remote_config(config, shapes: List[Dict]) -> None:
    """The family's config plus each block's sizes and the class (modeling_pruned.py) that builds them."""
    config.pruned_blocks = shapes
    if family(config) == "llama":
        config.head_dim = shapes[0]["head_dim"]  # the rotary embedding's width
    name = CLASSES[config.model_type][1]
    config.auto_map = {"AutoModelForCausalLM": f"modeling_pruned.{name}"}
    config.architectures = [name]


def save(model: nn.Module, tokenizer, out_dir: Path, nonuniform: str = "remote_code") -> Dict:
    """Write a checkpoint that `from_pretrained` loads (see the module's docstring for the layouts);
    returns {"layout": "standard" | "remote_code" | "pad", "config": the saved config's sizes}."""
    if nonuniform not in NONUNIFORM:
        raise ConfigError(f"nonuniform={nonuniform!r} is not one of: {', '.join(NONUNIFORM)}")
    fam, model_type, hidden = family(model), model.config.model_type, model.config.hidden_size
    parts = layout(model)
    shapes = [_shape(p) for p in parts]
    plan = _bias_plan(model_type, shapes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _Edits() as edits:
        if plan is not None and _standard_possible(fam, hidden, shapes):
            kind, shape = "standard", shapes[0]
        elif nonuniform == "pad":
            if plan is None:
                raise ConfigError(f"a {model_type} config has no setting for biases on "
                                  f"{sorted({b for s in shapes for b in s['biases']})}, so padding cannot give a "
                                  f"standard checkpoint: save with nonuniform=remote_code")
            kind, shape = "pad", _pad(fam, hidden, parts, shapes, edits)
        else:
            kind, shape = "remote_code", None
        if plan is not None and kind != "remote_code":
            _fill_biases(layout(model), plan[1], edits)
        model.save_pretrained(out_dir)
    config = copy.deepcopy(model.config)  # after save_pretrained, which records architectures and dtype
    if kind == "remote_code":
        _remote_config(config, shapes)
        shutil.copyfile(pruned_modeling.__file__, out_dir / "modeling_pruned.py")
    else:
        _standard_config(config, shape, plan[0])
        (out_dir / "modeling_pruned.py").unlink(missing_ok=True)
    config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return {"layout": kind, "config": sizes(config)}


# ------------------------------------------------------------------------------ checking a removal
def check_window(model: nn.Module, calibration: Optional[Tensor]) -> Tensor:
    """The window a removal is checked on: the first calibration window, or a seeded random one."""
    if calibration is not None:
        return calibration[:1]
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (1, 32), generator=generator)


@torch.no_grad()
def logits(model: nn.Module, ids: Tensor, device: torch.device) -> Tensor:
    """The whole model's float32 logits for `ids`, computed on `device` (the model back on the CPU)."""
    model.to(device)
    out = model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()
    model.to("cpu")
    return out
