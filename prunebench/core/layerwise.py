"""Layer-wise pruning after training (Wanda, SparseGPT): each layer seen through its inputs.

A layer is a prunable Linear or Conv2d weight W, viewed as (outputs, features); its inputs on
the calibration data are X, (tokens, features): a Linear's input rows (every position of a
sequence is a token) or the patches F.unfold cuts for a Conv (features in the order of the
flattened filter, in_channels·kh·kw, so N:M blocks and Hessian columns line up with W's).
Layers go in the order the forward pass reaches them. Sequentially (the papers' code), each
layer is calibrated on what the already-pruned layers before it produce: the forward pass stops
at the layer, so calibrating layer l costs the layers before it, not the whole network.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError
from .device import exact_fp32
from .hooks import hooked

Stat = Callable[[Tensor], None]  # takes one batch's input rows (tokens, features)


def has_input_rows(module: nn.Module) -> bool:
    """Whether the module's input is one (tokens, features) matrix its weight multiplies."""
    return isinstance(module, nn.Linear) or (
        isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros")


def layer_modules(model: nn.Module, names: List[str], criterion: str) -> Dict[str, nn.Module]:
    """The module of each prunable weight; refuses what has no (tokens, features) view."""
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        module_name, _, param = name.rpartition(".")
        module = modules[module_name]
        if param != "weight" or not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise ConfigError(f"criterion={criterion} prunes Linear and Conv2d weights from their inputs; {name} is "
                              f"not one (set model.prune_biases=false, model.prune_norm=false, or criterion.exclude)")
        if not has_input_rows(module):
            raise ConfigError(f"criterion={criterion}: {module_name} is a grouped or non-zero-padded convolution, "
                              f"whose inputs are not one patch matrix (criterion.exclude=[{module_name}])")
        out[name] = module
    return out


def patches(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """im2col: a convolution's input as (N, C_in·kh·kw, positions), features in the order of its
    flattened filters. padding='same' is padded as the convolution pads it (it may be
    asymmetric, which F.unfold cannot do)."""
    padding = conv.padding
    if isinstance(padding, str):
        x, padding = F.pad(x, conv._reversed_padding_repeated_twice), 0
    return F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)


def input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The layer's input as (tokens, features), in the order of its flattened weight rows."""
    if isinstance(module, nn.Conv2d):
        cols = patches(module, x)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


class Tap:
    """A layer that is not a module of its own, seen through the call of the module that applies
    it (a mixture of experts' expert matrices, in their fused parameter): `rows(args)` gives the
    layer's input rows from that module's positional arguments, or None when none reach it. Taps
    of one `group` are parallel (none reads another's output): they are calibrated together."""

    def __init__(self, module: nn.Module, group: str):
        self.module, self.group = module, group

    def rows(self, args) -> Optional[Tensor]:
        raise NotImplementedError


def hook_point(layer) -> nn.Module:
    """The module whose call shows the layer its inputs."""
    return layer.module if isinstance(layer, Tap) else layer


def rows_of(layer, args) -> Optional[Tensor]:
    return layer.rows(args) if isinstance(layer, Tap) else input_rows(layer, args[0])


class Reached(Exception):
    """Raised by a hook to end the forward pass once the layer of interest has its input."""


def call_model(model: nn.Module, x: Tensor) -> Any:
    return model(x)


@torch.no_grad()
def feed(model: nn.Module, modules: Dict[str, Any], inputs: List[Any],
         stats: Dict[str, Stat], stop_at: Optional[str] = None, call: Callable = call_model) -> None:
    """Run the calibration inputs through the model (eval mode), handing each watched layer's
    input rows to its stat (a module, or a Tap); the pass ends at `stop_at`'s input when given.
    `call(model, input)` runs one input (a decoder block takes its hidden states and keyword
    arguments)."""
    def hook_of(name: str):
        def hook(module, args):
            rows = rows_of(modules[name], args)
            if rows is not None:  # a Tap no row reached (an expert the router sent no token to)
                stats[name](rows)
            if name == stop_at:
                raise Reached

        return hook

    was_training = model.training
    model.eval()
    try:
        with hooked([(hook_point(modules[n]), hook_of(n)) for n in stats], pre=True):
            for x in inputs:
                try:
                    call(model, x)
                except Reached:
                    pass
    finally:
        model.train(was_training)


def forward_order(model: nn.Module, modules: Dict[str, Any], x: Any, call: Callable = call_model) -> List[str]:
    """The layers in the order one forward pass (of the input x) first reaches them (the Taps of
    one module in their order in `modules`)."""
    at: Dict[int, List[str]] = {}
    for name, layer in modules.items():
        at.setdefault(id(hook_point(layer)), []).append(name)
    points = {str(key): hook_point(modules[names[0]]) for key, names in at.items()}
    seen: List[str] = []
    feed(model, points, [x], {key: (lambda rows, key=key: seen.append(key) if key not in seen else None)
                              for key in points}, call=call)
    order = [name for key in seen for name in at[int(key)]]
    return order + [n for n in modules if n not in order]  # never reached: last (they see no input)


class SquaredNorms:
    """Σ over tokens of x_j², per feature j (Wanda's ‖X_j‖₂²), in float64."""

    def __init__(self):
        self.value: Optional[Tensor] = None

    def __call__(self, rows: Tensor) -> None:
        part = rows.double().pow(2).sum(0)
        self.value = part if self.value is None else self.value + part


class Fluctuation:
    """Per feature j, the mean of x_j over tokens and its sample variance (1/(N−1) Σ (x_j − x̄_j)²,
    FLAP's fluctuation), merged batch by batch (Chan et al.'s pairwise update), in float64."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, None, None

    def __call__(self, rows: Tensor) -> None:
        rows = rows.double()
        n, mean = rows.shape[0], rows.mean(0)
        m2 = (rows - mean).pow(2).sum(0)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.pow(2) * (self.count * n / total)
        self.count = total

    @property
    def variance(self) -> Tensor:
        return self.m2 / max(1, self.count - 1)


class Gram:
    """H = 2 Σ x xᵀ over tokens / tokens (SparseGPT's Hessian of the layer-wise squared error)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.sum, self.tokens = dtype, None, 0

    def __call__(self, rows: Tensor) -> None:
        rows = rows.to(self.dtype)
        with exact_fp32():  # TF32 would round X to 10 bits before H is formed (the authors turn it off)
            part = rows.T @ rows
        self.sum = part if self.sum is None else self.sum + part
        self.tokens += rows.shape[0]

    def hessian(self) -> Tensor:
        return 2 * self.sum / self.tokens


def block_of(name: str) -> str:
    """The block a layer belongs to: its path up to the first numbered container ("blocks.3",
    "layer1.0", "model.layers.7"), or the layer itself when it has none."""
    parts = name.split(".")
    numbered = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[:numbered[0] + 1]) if numbered else name


def in_sequence(order: List[str], unit: str, parallel: Optional[Dict[str, str]] = None) -> List[List[str]]:
    """The groups calibrated together: each layer alone (but parallel layers, of one group in
    `parallel`, together), or consecutive layers of one block."""
    if unit not in ("layer", "block"):
        raise ValueError(f"sequential unit must be layer or block, got {unit!r}")
    together = block_of if unit == "block" else (lambda name: (parallel or {}).get(name, name))
    groups: List[List[str]] = []
    for name in order:
        if groups and together(groups[-1][-1]) == together(name):
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def layer_by_layer(model: nn.Module, modules: Dict[str, Any], inputs: List[Any], sequential: bool,
                   new_stat: Callable[[str], Stat], prune: Callable[[str, Stat], None], unit: str = "layer",
                   call: Callable = call_model) -> None:
    """prune(name, stat) for every layer in forward order, its stat filled from its inputs: on
    the network as pruned so far (sequential; unit=block: the layers of a block all on the
    block's input as the pruned blocks before produce it, as the authors' scripts do), or all of
    them on the network as it is now."""
    order = forward_order(model, modules, inputs[0], call)
    if sequential:
        parallel = {n: layer.group for n, layer in modules.items() if isinstance(layer, Tap)}
        for group in in_sequence(order, unit, parallel):
            stats = {n: new_stat(n) for n in group}
            feed(model, modules, inputs, stats, stop_at=group[-1], call=call)
            for name in group:
                prune(name, stats[name])
        return
    stats = {n: new_stat(n) for n in order}
    feed(model, modules, inputs, stats, call=call)
    for name in order:
        prune(name, stats[name])


def measurable_weights(model: nn.Module, masks) -> Dict[str, Tensor]:
    """Copies of the prunable weights whose outputs have a (tokens, features) view (Linear, Conv2d)."""
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    out = {}
    for name in masks.names():
        module_name, _, param = name.rpartition(".")
        module = modules[module_name]
        if param == "weight" and has_input_rows(module):
            out[name] = params[name].detach().clone()
    return out


def reconstruction_errors(model: nn.Module, dense: Dict[str, Tensor], inputs: List[Tensor]) -> Dict[str, float]:
    """Per pruned layer, ‖XWᵀ − XŴᵀ‖² / ‖XWᵀ‖² on its inputs X in the pruned network: W the dense
    weights (`dense`, by weight name), Ŵ the pruned (and reconstructed) ones in the model."""
    modules = layer_modules(model, list(dense), "calibration.layer_errors")
    params = dict(model.named_parameters())
    sums = {n: torch.zeros(2, dtype=torch.float64) for n in dense}

    def stat_of(name: str) -> Stat:
        def add(rows: Tensor) -> None:
            w, w_hat = dense[name], params[name].detach()
            w, w_hat = w.reshape(w.shape[0], -1), w_hat.reshape(w_hat.shape[0], -1)
            rows = rows.double()
            out, err = rows @ w.double().T, rows @ (w - w_hat).double().T
            sums[name] += torch.stack([err.pow(2).sum(), out.pow(2).sum()]).cpu()

        return add

    feed(model, modules, inputs, {n: stat_of(n) for n in dense})
    return {n: float(s[0] / s[1]) if s[1] > 0 else 0.0 for n, s in sums.items()}
