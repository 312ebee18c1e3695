"""Structural units of a network, and turning a structured mask into a physically smaller one.

A *unit* is one output channel of a Conv/Linear layer, its *producer*. Removing it removes the
producer's weight row and bias entry, the entries of a batch norm that follows, and the input
columns of every layer that reads it. Torch-Pruning's dependency graph finds those dependents
through pools, activations, flatten and residual adds, so no model needs hand-written rules.

A layer is a producer only when its channels can go on their own: it is not the network's
output, and no residual add ties its channels to another layer's. In a ResNet that leaves the
first convolution of each block (Li et al. 2017 prune exactly those).

In the masked network a removed unit is zeros: its weight row, its consumers' columns (so the
zero count is what compaction takes away), and its bias and batch-norm scale and shift (so the
channel outputs exactly 0 and the masked and compacted networks compute the same function).

A model may instead declare its units (`DeclaredStructure`: a ViT's attention heads and MLP
channels, which a dependency graph cannot split through the heads' reshape): a unit then owns a
block of `span` consecutive rows/columns, and compaction slices those tensors directly.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Tuple

import torch
from torch import Tensor, nn

from .hooks import hooked
from .masks import Masks

log = logging.getLogger("prunebench")

LAYER_TYPES = (nn.Conv2d, nn.Linear)
BN_TYPES = nn.modules.batchnorm._BatchNorm  # SyncBatchNorm (train.sync_bn) too


@dataclass(frozen=True)
class Slice:
    """Unit j of a producer owns `param[j*block:(j+1)*block]` along `dim`."""

    param: str  # parameter name, e.g. "conv2.weight"
    dim: int  # 0: output side (rows, bias, norm); 1: input columns of a consumer
    block: int = 1  # > 1 where a flatten spreads one channel over several features


@dataclass
class Producer:
    module: str  # module name, e.g. "features.conv3"
    units: int  # output channels
    stage: int  # layers with outputs of the same spatial size form a stage (0-based)
    slices: List[Slice] = field(default_factory=list)  # all parameter slices a unit owns

    @property
    def weight(self) -> str:
        return f"{self.module}.weight" if self.module else "weight"

    def consumers(self) -> List[Slice]:
        return [s for s in self.slices if s.dim == 1]


def _graph(model: nn.Module, example: Tensor):
    import torch_pruning as tp  # imported here: only structured runs need it

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp, tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)


def _out_fn(tp, module: nn.Module):
    return tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) else tp.prune_linear_out_channels


def _output_sizes(model: nn.Module, example: Tensor) -> Dict[str, Tuple[int, ...]]:
    """Spatial size of each Conv/Linear layer's output (empty for Linear): what stages are made of."""
    sizes = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    with hooked([(m, lambda mod, inp, out, n=n: sizes.__setitem__(n, tuple(out.shape[2:]))) for n, m in layers]):
        with torch.no_grad():
            model(example)
    return sizes


class Structure:
    """The producers of a model and what each of their units owns."""

    def __init__(self, producers: Dict[str, Producer], skipped: Dict[str, str], stage_count: int):
        self.producers = producers  # by weight name (the mask name), in module order
        self.skipped = skipped  # module name -> why its channels cannot be removed alone
        self.stage_count = stage_count

    @classmethod
    def of(cls, model: nn.Module, input_shape: Tuple[int, ...]) -> "Structure":
        param = next(model.parameters())
        example = torch.zeros((1,) + tuple(input_shape), device=param.device, dtype=param.dtype)
        was_training = model.training
        model.eval()
        try:
            tp, graph = _graph(model, example)
            sizes = _output_sizes(model, example)
        finally:
            model.train(was_training)
        modules = dict(model.named_modules())
        names = {m: n for n, m in modules.items()}
        stage_of: Dict[Tuple[int, ...], int] = {}
        producers, skipped = {}, {}
        for name, module in modules.items():
            if not isinstance(module, LAYER_TYPES):
                continue
            units = module.weight.shape[0]
            first = _slices(tp, graph, module, [0], names)
            if isinstance(first, str):
                skipped[name] = first
                continue
            if not any(s.dim == 1 for s, _ in first):
                skipped[name] = "its outputs are the network's outputs"
                continue
            last = _slices(tp, graph, module, [units - 1], names)
            if units > 1 and last != [(s, [i + (units - 1) * s.block for i in idx]) for s, idx in first]:
                skipped[name] = "its channels map to its consumers' inputs in an unsupported order"
                continue
            stage = stage_of.setdefault(sizes[name], len(stage_of))
            producers[f"{name}.weight"] = Producer(name, units, stage, [s for s, _ in first])
        return cls(producers, skipped, len(stage_of))

    # ------------------------------------------------------------------------------ masks
    def unit_masks(self, keep: Dict[str, Tensor], like: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """0/1 masks of the tensors in `like` (by parameter name) that units touch, from a bool
        per unit by producer: the removed units' slices are 0."""
        out: Dict[str, Tensor] = {}
        for weight, k in keep.items():
            for s in self.producers[weight].slices:
                if s.param not in like:
                    continue
                p = like[s.param]
                m = out.setdefault(s.param, torch.ones_like(p, memory_format=torch.contiguous_format))
                along = k.to(p.device, p.dtype).repeat_interleave(s.block)
                view = [1] * p.dim()
                view[s.dim] = -1
                m.mul_(along.reshape(view))
        return out

    def alive(self, weight: str, mask: Tensor) -> Tensor:
        """Bool per unit: False where the producer's weight rows of the unit are all zero in `mask`."""
        return mask.reshape(self.producers[weight].units, -1).any(dim=1)

    def coupled(self, masks: Masks, model: nn.Module) -> Masks:
        """Masks of the non-prunable parameters (biases, norm scale/shift) of removed units."""
        keep = {w: self.alive(w, masks[w]) for w in self.producers if w in masks}
        return Masks({n: m for n, m in self.unit_masks(keep, dict(model.named_parameters())).items() if n not in masks})

    # ------------------------------------------------------------------------- compaction
    @torch.no_grad()
    def compact(self, model: nn.Module, masks: Masks, input_shape: Tuple[int, ...]) -> nn.Module:
        """A copy of `model` with every removed unit physically gone (same function, in eval mode)."""
        small = copy.deepcopy(model).eval()
        param = next(small.parameters())
        with torch.enable_grad():
            tp, graph = _graph(small, torch.zeros((1,) + tuple(input_shape), device=param.device, dtype=param.dtype))
        for weight, producer in self.producers.items():
            removed = (~self.alive(weight, masks[weight])).nonzero().squeeze(1).tolist()
            if removed:
                module = small.get_submodule(producer.module)
                graph.get_pruning_group(module, _out_fn(tp, module), idxs=removed).prune()
        return small.to(memory_format=torch.contiguous_format)


class DeclaredStructure(Structure):
    """Units a model declares (`model.units()`, models/vit.py): per kind and block, the layers whose
    rows and whose input columns a unit owns, `span` consecutive ones per unit."""

    @classmethod
    def of_units(cls, units) -> "DeclaredStructure":
        producers = {}
        for u in units:
            rows = [Slice(f"{m}.{p}", 0, u.span) for m in u.rows for p in ("weight", "bias")]
            columns = [Slice(f"{m}.weight", 1, u.span) for m in u.columns]
            producers[f"{u.owner}.weight"] = Producer(u.owner, u.count, 0, rows + columns)
        return cls(producers, {}, 1)

    @torch.no_grad()
    def compact(self, model: nn.Module, masks: Masks, input_shape: Tuple[int, ...]) -> nn.Module:
        """A copy of `model` with the removed units' rows and columns sliced out of its Linear layers."""
        small = copy.deepcopy(model).eval()
        for weight, producer in self.producers.items():
            alive = self.alive(weight, masks[weight]).nonzero().squeeze(1).to(next(small.parameters()).device)
            for s in producer.slices:
                module_name, _, name = s.param.rpartition(".")
                module = small.get_submodule(module_name)
                if not isinstance(module, nn.Linear):
                    raise TypeError(f"declared units slice Linear layers only, not {module_name}")
                if getattr(module, name) is None:
                    continue  # a layer without bias
                idx = (alive[:, None] * s.block + torch.arange(s.block, device=alive.device)).reshape(-1)
                old = getattr(module, name)
                setattr(module, name, nn.Parameter(old.index_select(s.dim, idx).clone(),
                                                   requires_grad=old.requires_grad))
                module.out_features, module.in_features = module.weight.shape
        return small


def _slices(tp, graph, module: nn.Module, idxs: List[int], names) -> "List[Tuple[Slice, List[int]]] | str":
    """What removing output channels `idxs` of `module` touches, or why it cannot be done alone."""
    out = []
    for dep, dep_idxs in graph.get_pruning_group(module, _out_fn(tp, module), idxs=idxs):
        target = dep.target.module
        if isinstance(target, nn.Parameter):  # used bare in a forward: a ViT's position embeddings
            return "its channels are added to a parameter (position embeddings), which is not supported"
        own = [n for n, _ in target.named_parameters(recurse=False)]
        if not own:
            continue  # activations, pools, flatten, adds: nothing to mask
        name = names[target]
        prefix = f"{name}." if name else ""
        is_out = graph.is_out_channel_pruning_fn(dep.handler)
        if isinstance(target, LAYER_TYPES) and target is not module:
            if is_out:
                return f"a residual connection ties its channels to {name}'s"
            if getattr(target, "groups", 1) != 1:
                return f"its consumer {name} is a grouped convolution"
            block = len(dep_idxs) // len(idxs)
            if len(dep_idxs) % len(idxs) or dep_idxs[:block] != list(range(idxs[0] * block, (idxs[0] + 1) * block)):
                return f"its channels map to {name}'s inputs in an unsupported order"
            out.append((Slice(prefix + "weight", 1, block), list(dep_idxs)))
        elif target is module or isinstance(target, BN_TYPES):
            out.extend((Slice(prefix + p, 0), list(dep_idxs)) for p in own)
        else:
            return f"its channels feed {name} ({type(target).__name__}), which is not supported"
    return out


@torch.no_grad()
def expand_into(structure: Structure, model: nn.Module, compact: nn.Module, masks: Masks) -> None:
    """Copy a compacted network's parameters and buffers back into the masked full-size one.

    Each removed unit is an index along one dimension of the tensors its producer touches, and
    compaction keeps the others in order, so every tensor of `compact` is `full[kept_0, kept_1]`.
    (Fine-tuning the compacted network and writing it back gives the masked network exactly
    what masked fine-tuning would, at the compacted network's cost.)"""
    kept: Dict[str, Dict[int, Tensor]] = {}  # tensor name -> dim -> kept indices
    modules = dict(model.named_modules())
    for weight, producer in structure.producers.items():
        alive = structure.alive(weight, masks[weight]).nonzero().squeeze(1)
        for s in producer.slices:
            idx = (alive[:, None] * s.block + torch.arange(s.block, device=alive.device)).reshape(-1)
            kept.setdefault(s.param, {})[s.dim] = idx
            module_name, _, param = s.param.rpartition(".")
            if isinstance(modules[module_name], BN_TYPES) and param == "weight":
                for buf in ("running_mean", "running_var"):
                    kept.setdefault(f"{module_name}.{buf}", {})[0] = idx
    small = {**dict(compact.named_parameters()), **dict(compact.named_buffers())}
    for name, full in [*model.named_parameters(), *model.named_buffers()]:
        value = small[name].to(full.dtype)
        dims = kept.get(name, {})
        if not dims:
            full.copy_(value)
            continue
        index = [dims.get(d, torch.arange(full.shape[d], device=full.device)) for d in range(min(2, full.dim()))]
        if len(index) == 2:
            full.zero_()[index[0][:, None], index[1][None, :]] = value
        else:
            full.zero_()[index[0]] = value


# ---------------------------------------------------------------------------------- latency
def _timed(model: nn.Module, x: Tensor) -> float:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    start = time.perf_counter()
    model(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - start


@torch.no_grad()
def compare_latency(dense: nn.Module, compact: nn.Module, input_shape: Tuple[int, ...], batch_sizes,
                    repeats: int, warmup: int = 2, precision: str = "fp32",
                    channels_last: bool = False) -> Dict[str, float]:
    """Median seconds of a forward pass (eval mode) of both networks, and the speedup, per batch
    size, in the run's precision and memory layout (what its training and evaluation run in).

    The two are timed alternately on the same input, so that drift (allocator warm-up, clock,
    other load) hits both alike: timing one after the other was off by up to 2x here."""
    from .device import autocast, to_layout

    out: Dict[str, float] = {}
    modes = dense.training, compact.training
    dense.eval()
    compact.eval()
    param = next(dense.parameters())
    for b in batch_sizes:
        x = to_layout(torch.randn((b,) + tuple(input_shape), device=param.device, dtype=param.dtype), channels_last)
        with autocast(precision, x.device):
            for _ in range(warmup):
                dense(x)
                compact(x)
            times = [(_timed(dense, x), _timed(compact, x)) for _ in range(repeats)]
        out[f"dense_latency_b{b}"] = statistics.median(t[0] for t in times)
        out[f"compact_latency_b{b}"] = statistics.median(t[1] for t in times)
        out[f"speedup_b{b}"] = out[f"dense_latency_b{b}"] / out[f"compact_latency_b{b}"]
    out["latency_precision"] = precision
    dense.train(modes[0])
    compact.train(modes[1])
    return out


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
