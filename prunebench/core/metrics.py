"""Sparsity, size and compute, counted from the zeros really present in the weights (not the masks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .hooks import hooked
from .masks import NORM_TYPES


@dataclass
class LayerStats:
    layer: str
    shape: List[int]
    params: int
    nonzero: int
    flops: int = 0  # multiply-accumulates of this layer per example, dense
    flops_remaining: int = 0  # ... counting only the nonzero weights

    @property
    def density(self) -> float:
        return self.nonzero / self.params


@dataclass
class WeightStats:
    params_total: int  # every parameter (weights, biases, norm layers)
    params_nonzero: int
    prunable_total: int  # the masked parameters (Conv/Linear weights by default)
    prunable_nonzero: int
    layers: List[LayerStats] = field(default_factory=list)
    flops: int = 0  # multiply-accumulates of one forward pass of one example, dense
    flops_remaining: int = 0  # ... with the pruned weights' MACs removed

    @property
    def sparsity(self) -> float:
        """Fraction of zeros among the prunable weights."""
        return 1.0 - self.prunable_nonzero / self.prunable_total

    @property
    def compression(self) -> float:
        """All parameters / nonzero parameters."""
        return self.params_total / max(1, self.params_nonzero)


@dataclass
class MacCount:
    """Dense multiply-accumulates per example: the whole model and each module."""

    total: int
    per_module: Dict[str, int]


# modules that multiply-accumulate only through the Conv/Linear modules inside them; a model made
# of these alone is counted by hooks (the dispatch-mode counter imports torch's compiler, ~1.5 s)
PLAIN_MODULES = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d,
                 nn.SyncBatchNorm, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout,
                 nn.Identity)


def compute_in_layers(model: nn.Module) -> bool:
    """Whether every multiply-accumulate is in a Conv2d or Linear module: each module is a plain
    one, or its class says so (`MACS_IN_LAYERS = True`: its own forward only adds, pads, reshapes)."""
    return all(type(m) in PLAIN_MODULES or getattr(type(m), "MACS_IN_LAYERS", False) for m in model.modules())


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: Tuple[int, ...], device=None) -> MacCount:
    """MACs of one example's forward pass: of its matrix multiplies and convolutions (not
    activations, norms or bias adds), the convention of pruning papers' "FLOPs". Per module,
    each container counts what its children do."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.zeros((1,) + tuple(input_shape), device=device)
    per_module = layer_macs(model, x) if compute_in_layers(model) else dispatched_macs(model, x)
    model.train(was_training)
    return MacCount(total=per_module.pop("", 0), per_module=per_module)


def layer_macs(model: nn.Module, x: torch.Tensor) -> Dict[str, int]:
    """By forward hooks on the Conv2d/Linear modules: output elements × inputs each one reads."""
    own: Dict[str, int] = {}

    def hook(name):
        def count(module, inputs, out):
            if isinstance(module, nn.Linear):
                own[name] = own.get(name, 0) + out.numel() * module.in_features
            else:
                per_output = module.in_channels // module.groups * module.weight[0, 0].numel()
                own[name] = own.get(name, 0) + out.numel() * per_output
        return count

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with hooked([(m, hook(n)) for n, m in layers]):
        model(x)
    totals: Dict[str, int] = {}
    for name, macs in own.items():  # each module and every module above it
        parts = name.split(".")
        for i in range(len(parts) + 1):
            key = ".".join(parts[:i])
            totals[key] = totals.get(key, 0) + macs
    return totals


def dispatched_macs(model: nn.Module, x: torch.Tensor) -> Dict[str, int]:
    """By torch.utils.flop_counter (FLOPs = 2 MACs): every matmul and convolution, wherever it is."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # attention in its math form (two matmuls): the CPU's fused kernel has no FLOP formula, counted 0
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(x)
    counts = counter.get_flop_counts()
    prefix = type(model).__name__ + "."
    out = {name[len(prefix):]: sum(ops.values()) // 2 for name, ops in counts.items() if name.startswith(prefix)}
    out[""] = sum(counts.get("Global", {}).values()) // 2
    return out


def weight_stats(model: nn.Module, prunable: Iterable[str], macs: Optional[MacCount] = None) -> WeightStats:
    """Counts from the weights as they are. With `macs`, each pruned weight also removes its
    share of its layer's multiply-accumulates (every weight of a conv/linear layer takes part
    in the same number of them)."""
    params = dict(model.named_parameters())
    layers = []
    for n in prunable:
        p = params[n]
        stats = LayerStats(n, list(p.shape), p.numel(), int(p.count_nonzero()))
        if macs is not None and n.endswith(".weight") and not is_norm(model, n):
            stats.flops = macs.per_module.get(n.rpartition(".")[0], 0)
            stats.flops_remaining = stats.flops * stats.nonzero // stats.params
        layers.append(stats)
    total = macs.total if macs is not None else 0
    return WeightStats(
        params_total=sum(p.numel() for p in params.values()),
        params_nonzero=sum(int(p.count_nonzero()) for p in params.values()),
        prunable_total=sum(s.params for s in layers),
        prunable_nonzero=sum(s.nonzero for s in layers),
        layers=layers,
        flops=total,
        flops_remaining=total - sum(s.flops - s.flops_remaining for s in layers))


def is_norm(model: nn.Module, param_name: str) -> bool:
    module = model.get_submodule(param_name.rpartition(".")[0])
    return isinstance(module, NORM_TYPES)
