"""Sparse execution of unstructured masks: CSR matrix products for the layers where, measured on
this machine at the batch size that matters, they beat the dense kernels.

A Linear layer computes W x as `torch.sparse.mm(W_csr, xᵀ)ᵀ`; a Conv2d (groups=1) as that product
over the im2col patches of its input (`layerwise.patches`). Which layers run sparse is decided per layer
by timing both on the layer's real input; the result must equal the dense layer's to float
tolerance (checked in full fp32, TF32 off), so a sparse network is the same function, only its speed differs. Inference
only (eval mode, no autograd); fp32, on the CPU or a CUDA device (cuSPARSE).
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from .device import exact_fp32
from .hooks import hooked
from .layerwise import patches

# torch warns once that CSR support is "beta"; the products used here are checked against the
# dense ones each time a layer is converted (sparsify), which says more
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


class SparseLinear(nn.Module):
    """nn.Linear with its weight as a CSR matrix (for inference on the device it was made on)."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight_csr = layer.weight.detach().float().to_sparse_csr()
        self.bias = None if layer.bias is None else layer.bias.detach().float().clone()

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.sparse.mm(self.weight_csr, flat.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class SparseConv2d(nn.Module):
    """nn.Conv2d (groups=1) as a CSR matrix times the im2col patches of its input."""

    def __init__(self, layer: nn.Conv2d):
        super().__init__()
        if layer.groups != 1 or layer.padding_mode != "zeros":
            raise ValueError("sparse execution covers convolutions with groups=1 and zero padding")
        self.out_channels = layer.out_channels
        self.kernel_size, self.stride = layer.kernel_size, layer.stride
        self.padding, self.dilation = layer.padding, layer.dilation
        self._reversed_padding_repeated_twice = layer._reversed_padding_repeated_twice  # what patches() pads
        self.weight_csr = layer.weight.detach().float().reshape(layer.out_channels, -1).to_sparse_csr()
        self.bias = None if layer.bias is None else layer.bias.detach().float().clone()

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        cols = patches(self, x)  # (N, C·kh·kw, L), as the layer-wise criteria see the input
        out_h, out_w = self.output_size(h, w)
        flat = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # (C·kh·kw, N·L)
        out = torch.sparse.mm(self.weight_csr, flat)  # (out, N·L)
        out = out.reshape(self.out_channels, n, out_h * out_w).transpose(0, 1)
        if self.bias is not None:
            out = out + self.bias[None, :, None]
        return out.reshape(n, self.out_channels, out_h, out_w)

    def output_size(self, h: int, w: int) -> Tuple[int, int]:
        if self.padding == "same":  # stride 1 (torch allows no other)
            return h, w
        pad = (0, 0) if self.padding == "valid" else self.padding
        return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                     for size, p, d, k, s in zip((h, w), pad, self.dilation, self.kernel_size, self.stride))


def sparse_version(layer: nn.Module) -> nn.Module:
    return SparseLinear(layer) if isinstance(layer, nn.Linear) else SparseConv2d(layer)


def can_run_sparse(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1
                                            and layer.padding_mode == "zeros"
                                            and (layer.padding != "same" or all(s == 1 for s in layer.stride)))


MARGIN = 0.9  # a layer runs sparse when that takes < 90% of its dense time: not on timing noise


def median_ms(fn, repeats: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


@torch.no_grad()
def layer_inputs(model: nn.Module, x: Tensor, names: List[str]) -> Dict[str, Tensor]:
    """What each named layer receives when the model runs on `x`."""
    seen: Dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    with hooked([(modules[n], lambda m, args, n=n: seen.setdefault(n, args[0])) for n in names], pre=True):
        model(x)
    return seen


@torch.no_grad()
def sparsify(model: nn.Module, x: Tensor, repeats: int = 10, warmup: int = 2) -> Tuple[nn.Module, Dict[str, Dict]]:
    """A copy of `model` (eval mode, fp32) in which every Conv2d/Linear layer with pruned weights
    that runs faster as CSR on `x`'s batch does so; per such layer, its density and both times."""
    net = copy.deepcopy(model).float().eval()
    candidates = [n for n, m in net.named_modules()
                  if isinstance(m, (nn.Linear, nn.Conv2d)) and can_run_sparse(m) and bool((m.weight == 0).any())]
    inputs = layer_inputs(net, x.float(), candidates)
    report: Dict[str, Dict] = {}
    for name in candidates:
        layer, inp = net.get_submodule(name), inputs[name]
        sparse = sparse_version(layer)
        with exact_fp32():  # cuSPARSE computes in full fp32; a TF32 dense product differs by ~1e-3
            ref, out = layer(inp), sparse(inp)
        if not torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()) + 1e-6):
            raise RuntimeError(f"the sparse version of {name} computes something else "
                               f"(max abs difference {float((out - ref).abs().max()):.3g})")
        dense_ms = median_ms(lambda: layer(inp), repeats, warmup, x.device)
        sparse_ms = median_ms(lambda: sparse(inp), repeats, warmup, x.device)
        chosen = sparse_ms < MARGIN * dense_ms
        report[name] = {"density": float((layer.weight != 0).float().mean()), "dense_ms": dense_ms,
                        "sparse_ms": sparse_ms, "sparse": chosen}
        if chosen:
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, sparse)
    return net, report


def sparse_latency(model: nn.Module, input_shape, batch_sizes, repeats: int, warmup: int) -> Dict[str, Dict]:
    """Per batch size: the pruned network run dense and run with sparse kernels where they pay
    (chosen at that batch size), median milliseconds of a forward pass, the layers that ran
    sparse, and whether the sparse network is the faster one (`adopted`). Both in fp32 eval mode
    on the model's device."""
    device = next(model.parameters()).device
    dense = copy.deepcopy(model).float().eval()
    out = {}
    for b in batch_sizes:
        x = torch.randn((b,) + tuple(input_shape), generator=torch.Generator().manual_seed(0)).to(device)
        net, layers = sparsify(dense, x, repeats, warmup)
        with torch.no_grad():
            with exact_fp32():
                same = torch.allclose(net(x), dense(x), rtol=1e-3, atol=1e-4)
            if not same:
                raise RuntimeError("the network with sparse layers computes something else than the dense one")
            dense_ms = median_ms(lambda: dense(x), repeats, warmup, device)
            sparse_ms = median_ms(lambda: net(x), repeats, warmup, device)
        out[f"batch_{b}"] = {"dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
                             "sparse_layers": [n for n, r in layers.items() if r["sparse"]],
                             # layers that each pay can still lose together (their outputs' layout)
                             "adopted": sparse_ms < dense_ms}
    return out


def sparse_state_dict(model: nn.Module) -> Dict:
    """The model's state with each Conv/Linear weight that has zeros stored as a CSR matrix of its
    rows (int32 indices: 8 bytes per nonzero instead of 4 per weight), and the shapes to
    restore. Load it with torch alone:

        saved = torch.load("model_sparse.pt", weights_only=True)
        state = {k: v.to_dense().reshape(saved["shapes"][k]) if k in saved["shapes"] else v
                 for k, v in saved["state_dict"].items()}
    """
    state, shapes = {}, {}
    sparse_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if k in sparse_weights and bool((v == 0).any()):
            csr = v.reshape(v.shape[0], -1).to_sparse_csr()
            state[k] = torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(), csr.values(),
                                               csr.shape, check_invariants=True)
            shapes[k] = list(v.shape)
        else:
            state[k] = v
    return {"format": "prunebench sparse state_dict 1", "state_dict": state, "shapes": shapes}
