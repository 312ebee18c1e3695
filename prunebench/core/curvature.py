"""Diagonals of curvature matrices of the mean cross-entropy loss, for second-order criteria.

All estimators work on the model in eval mode (batch norm on its running statistics, so one
example's gradient does not depend on the others') and return, for each named parameter, a
tensor of its shape:

- empirical Fisher: mean over examples of the squared per-example gradient, labels from data;
- Fisher: the same with labels sampled from the model's own softmax;
- GGN: the exact diagonal of the Gauss-Newton matrix, mean over examples of diag(Jᵀ H_f J),
  with H_f = diag(p) − ppᵀ the softmax cross-entropy Hessian in the logits (written as A Aᵀ
  with A = diag(√p) − p√pᵀ, so the diagonal is Σ_k (Jᵀ a_k)²);
- Hutchinson: E[z ⊙ Hz] over Rademacher probes z, with Hessian-vector products of the loss.

Per-example quantities are vectorised with torch.func (vmap), never a Python loop over examples.

Also the Kronecker factors of K-FAC / KFC (kfac_factors), the curvature that EigenDamage and
Kron-OBD/OBS prune in: a block per layer instead of a diagonal.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap

from .layerwise import patches

Batch = Tuple[Tensor, Tensor]


def _split(model: nn.Module, names: List[str]):
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    chosen = {n: params[n] for n in names}
    return params, buffers, chosen


def _one_output(model, params, buffers, chosen, x):
    return functional_call(model, ({**params, **chosen}, buffers), (x.unsqueeze(0),)).squeeze(0)


class OutOfMemoryBudget(RuntimeError):
    """The smallest chunk of a curvature estimate does not fit in the memory budget."""


def parameter_bytes(model: nn.Module, names: Sequence[str]) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() * params[n].element_size() for n in names)


def fit_chunk(per_item: int, memory: Optional[int], most: int) -> int:
    """How many items of `per_item` bytes fit in `memory` (at most `most`; all when unbounded)."""
    return most if memory is None else max(0, min(most, memory // max(1, per_item)))


def fisher_diagonal(model: nn.Module, names: List[str], batches: Iterable[Batch],
                    sample_labels: bool = False, generator: Optional[torch.Generator] = None,
                    chunk_size: Optional[int] = None, memory: Optional[int] = None) -> Dict[str, Tensor]:
    """Mean squared per-example gradient: empirical (data labels) or true Fisher (sampled labels).

    A batch's per-example gradients (and their squares) are held at once, examples × |θ| × 2
    floats; with a `memory` budget in bytes a batch that does not fit is taken in chunks."""
    per_example = 2 * parameter_bytes(model, names)
    total, count = {}, 0
    for x, y in batches:
        if sample_labels:
            was_training = model.training
            model.eval()
            with torch.no_grad():
                probs = F.softmax(model(x), dim=1)
            model.train(was_training)
            y = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(x.device)
        step = fit_chunk(per_example, memory, x.shape[0])
        if step < 1:
            raise OutOfMemoryBudget(f"one example's gradient needs {per_example} bytes, the budget is {memory}")
        for start in range(0, x.shape[0], step):
            grads = per_example_gradients(model, names, x[start:start + step], y[start:start + step], chunk_size)
            for n in names:
                sq = grads[n].pow(2).sum(0)
                total[n] = total[n] + sq if n in total else sq
        count += x.shape[0]
    return {n: t / count for n, t in total.items()}


def per_example_gradients(model: nn.Module, names: List[str], x: Tensor, y: Tensor,
                          chunk_size: Optional[int] = None) -> Dict[str, Tensor]:
    """∂CE(f(x_i), y_i)/∂θ for every example i (leading dimension), model in eval mode."""
    was_training = model.training
    model.eval()
    params, buffers, chosen = _split(model, names)

    def loss(sub, xi, yi):
        return F.cross_entropy(_one_output(model, params, buffers, sub, xi).unsqueeze(0), yi.unsqueeze(0))

    try:
        return vmap(grad(loss), in_dims=(None, 0, 0), chunk_size=chunk_size)(chosen, x, y)
    finally:
        model.train(was_training)


def woodbury_update(h_inv: Tensor, x: Tensor, n: int) -> Tensor:
    """(H + XᵀX/n)⁻¹ from H⁻¹, for a batch of blocks: h_inv (blocks, B, B), x (blocks, k, B).

    H⁻¹ − H⁻¹Xᵀ(n·I + X H⁻¹ Xᵀ)⁻¹ X H⁻¹: the recursive form of Hassibi & Stork (1993), k
    gradients at a time, so the empirical Fisher αI + (1/n)Σ g gᵀ is never formed or inverted.
    """
    hx = h_inv @ x.transpose(1, 2)  # blocks, B, k
    inner = n * torch.eye(x.shape[1], dtype=x.dtype, device=x.device) + x @ hx  # blocks, k, k
    return h_inv - hx @ torch.linalg.solve(inner, hx.transpose(1, 2))


def ggn_diagonal(model: nn.Module, names: List[str], batches: Iterable[Batch],
                 chunk_size: int = 16, memory: Optional[int] = None) -> Dict[str, Tensor]:
    """Exact diagonal of the Gauss-Newton matrix of the mean cross-entropy (labels unused).

    Each example holds one Jᵀa_k per class, classes × |θ| floats (and their squares): up to
    `chunk_size` examples at once; with a `memory` budget in bytes, fewer, and when one
    example's classes do not fit, its classes in chunks."""
    was_training = model.training
    model.eval()
    params, buffers, chosen = _split(model, names)
    count, size = 0, parameter_bytes(model, names)  # one |θ|-sized tensor
    total = {n: torch.zeros_like(p) for n, p in chosen.items()}
    try:
        for x, _ in batches:
            if count == 0:  # the class count, from the first example
                classes = _one_output(model, params, buffers, chosen, x[0]).shape[0]
                examples = fit_chunk((2 * classes + 1) * size, memory, chunk_size)
                class_chunk = classes if examples >= 1 else fit_chunk(2 * size, memory - size, classes - 1)
                if class_chunk < 1:
                    raise OutOfMemoryBudget(f"one class column of the GGN needs {3 * size} bytes, "
                                            f"the budget is {memory}")
                per_example = vmap(partial(_ggn_one, model, params, buffers, class_chunk), in_dims=(None, 0),
                                   chunk_size=max(1, examples))
            diag = per_example(chosen, x)
            for n in names:
                total[n] += diag[n].sum(0)
            count += x.shape[0]
    finally:
        model.train(was_training)
    return {n: t / count for n, t in total.items()}


def _ggn_one(model, params, buffers, class_chunk: int, sub, x):
    """diag(Jᵀ H_f J) of one example, over its classes `class_chunk` at a time."""
    logits, pullback = vjp(lambda s: _one_output(model, params, buffers, s, x), sub)
    p = F.softmax(logits, dim=0)
    sqrt_p = p.sqrt()
    a = torch.diag(sqrt_p) - torch.outer(p, sqrt_p)  # H_f = a aᵀ; columns a[:, k]
    out = None
    for k in range(0, a.shape[1], class_chunk):
        cols = vmap(pullback)(a.T[k:k + class_chunk])[0]  # Jᵀ a_k for these k
        part = {n: c.pow(2).sum(0) for n, c in cols.items()}
        out = part if out is None else {n: out[n] + part[n] for n in out}
    return out


@contextmanager
def twice_differentiable():
    """Attention through its math kernel: the fused ones (flash, the CPU kernel) have no second
    derivative, which GraSP's Hg and Hutchinson's Hz take."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


class LocalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over dim 1 of an input of any rank, in this process alone: what SyncBatchNorm
    computes when every rank holds the same batch."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of 2 or more dimensions, got {input.dim()}")


def without_sync_batchnorm(model: nn.Module) -> nn.Module:
    """`model` with every SyncBatchNorm replaced, in place, by a LocalBatchNorm holding the same
    parameters and statistics. SyncBatchNorm's backward has no derivative (double backward fails:
    "batch_norm_backward_reduce is not implemented"), and a criterion scores one batch that every
    rank holds, so syncing would add nothing."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.SyncBatchNorm):
            local = LocalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            local.weight, local.bias = child.weight, child.bias
            local.running_mean, local.running_var = child.running_mean, child.running_var
            local.num_batches_tracked = child.num_batches_tracked
            local.train(child.training)
            setattr(model, name, local)
        else:
            without_sync_batchnorm(child)
    return model


def _probe_generator(generator: Optional[torch.Generator], device: torch.device) -> torch.Generator:
    """Where Hutchinson's probes are drawn: on the CPU, the run's generator itself (the masks are
    pinned); on an accelerator, a generator there seeded from it, so no probe crosses the bus."""
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, (1,))))
    if device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def _rademacher(w: Tensor, generator: torch.Generator) -> Tensor:
    """±1 with probability ½ each, w's shape, dtype and device."""
    bits = torch.randint(0, 2, w.shape, generator=generator, device=generator.device)
    return (bits * 2 - 1).to(w)


def hutchinson_diagonal(model: nn.Module, names: List[str], batches: Iterable[Batch], probes: int,
                        generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
    """diag(H) of the mean loss over the batches, estimated by E[z ⊙ Hz] with Rademacher z.

    One batch's graph at a time: H = Σ_b H_b (the loss is a sum over batches), and every batch
    sees the same probes (the generator is replayed), so Σ_b z ⊙ H_b z is z ⊙ Hz."""
    was_training = model.training
    model.eval()
    named = dict(model.named_parameters())
    weights = [named[n] for n in names]
    batches = list(batches)
    count = sum(x.shape[0] for x, _ in batches)
    generator = _probe_generator(generator, weights[0].device)
    start = generator.get_state()
    total = [torch.zeros_like(w) for w in weights]
    try:
        with twice_differentiable():
            for x, y in batches:
                generator.set_state(start)
                loss = F.cross_entropy(model(x), y, reduction="sum") / count
                grads = torch.autograd.grad(loss, weights, create_graph=True)
                for _ in range(probes):
                    zs = [_rademacher(w, generator) for w in weights]
                    hz = torch.autograd.grad(grads, weights, grad_outputs=zs, retain_graph=True)
                    for t, z, h in zip(total, zs, hz):
                        t += z * h
                del grads, loss
    finally:
        model.train(was_training)
    return {n: (t / probes).detach() for n, t in zip(names, total)}


@dataclass
class KroneckerFactors:
    """One layer's K-FAC factors; W = weight.reshape(out, -1), with the bias as a last column."""

    A: Tensor  # (d_in, d_in) input-side factor, float64
    S: Tensor  # (d_out, d_out) output-gradient factor, float64
    has_bias: bool  # A's last coordinate is the homogeneous 1 multiplying the bias column
    examples: int  # N, the number of examples averaged over


def _check_kfac_layer(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"kfac_factors: layer {name!r} is a grouped convolution (groups={module.groups})")
        if module.padding_mode != "zeros":
            raise ValueError(f"kfac_factors: layer {name!r} has padding_mode={module.padding_mode!r}, not 'zeros'")
    elif not isinstance(module, nn.Linear):
        raise ValueError(f"kfac_factors: layer {name!r} is a {type(module).__name__}, not nn.Linear or nn.Conv2d")


def _patches(module: nn.Module, x: Tensor) -> Tensor:
    """Inputs as (N, T, d_in): unfolded patches of a conv, one position per leading row of a Linear."""
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, module.in_features)
    return patches(module, x).transpose(1, 2)


def _positions(module: nn.Module, out: Tensor) -> Tensor:
    """Output-side vectors as (N, T, d_out): channels last for a conv map, as is for a Linear."""
    if isinstance(module, nn.Linear):
        return out.reshape(out.shape[0], -1, module.out_features)
    return out.flatten(2).transpose(1, 2)


def kfac_factors(model: nn.Module, layers: Sequence[str], batches: Iterable[Batch], fisher: str = "true",
                 generator: Optional[torch.Generator] = None,
                 max_examples: Optional[int] = None) -> Dict[str, KroneckerFactors]:
    """K-FAC (Martens & Grosse 2015) / KFC (Grosse & Martens 2016) factors of each layer's Fisher.

    With ā_{n,t} the input patch at output position t (a trailing 1 for the bias) and g_{n,t} =
    ∂ℓ_n/∂s_{n,t} the gradient of example n's cross-entropy in the layer's pre-activation output:
    A = (1/N) Σ_n (1/T) Σ_t ā āᵀ and S = (1/N) Σ_n Σ_t g gᵀ (T = 1 for a Linear on (N, in) inputs).
    Then A ⊗ S = T·E_{n,t}[ā āᵀ] ⊗ E_{n,t}[g gᵀ], the KFC approximation of the Fisher of W in the
    column-stacking vec(W) = W.T.reshape(-1); for PyTorch's row-major W.reshape(-1) it is S ⊗ A.
    For a Linear layer and a single example it is exact: vec(∇W) vec(∇W)ᵀ = ā āᵀ ⊗ g gᵀ.

    fisher="true" samples each label from the model's softmax (as EigenDamage does), "empirical"
    uses the data labels. Eval mode (batch norm on running statistics); parameters' .grad untouched.
    """
    if fisher not in ("true", "empirical"):
        raise ValueError(f"kfac_factors: fisher must be 'true' or 'empirical', not {fisher!r}")
    modules = dict(model.named_modules())
    for name in layers:
        if name not in modules:
            raise ValueError(f"kfac_factors: no module named {name!r}")
        _check_kfac_layer(name, modules[name])
    device = next(model.parameters()).device
    inputs: Dict[str, Tensor] = {}
    outputs: Dict[str, Tensor] = {}

    def capture(name: str):
        def hook(module, args, out):
            if name in outputs:
                raise RuntimeError(f"kfac_factors: layer {name!r} is called more than once per forward")
            if not out.requires_grad:  # nothing upstream needs a gradient: make this output a leaf that does
                out = out.detach().requires_grad_()
            inputs[name], outputs[name] = args[0].detach(), out
            return out
        return hook

    A: Dict[str, Tensor] = {}
    S: Dict[str, Tensor] = {}
    count = 0
    was_training = model.training
    model.eval()
    handles = [modules[n].register_forward_hook(capture(n)) for n in layers]
    try:
        for x, y in batches:
            if max_examples is not None:
                if count >= max_examples:
                    break
                x, y = x[:max_examples - count], y[:max_examples - count]
            x, y = x.to(device), y.to(device)
            inputs.clear()
            outputs.clear()
            with torch.enable_grad():
                logits = model(x)
                if fisher == "true":
                    probs = F.softmax(logits.detach(), dim=1).cpu()
                    y = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)
                loss = F.cross_entropy(logits, y, reduction="sum")  # a sum: output grads are per-example
                grads = torch.autograd.grad(loss, [outputs[n] for n in layers])
            for name, g in zip(layers, grads):
                module = modules[name]
                a = _patches(module, inputs[name]).double()
                g = _positions(module, g).double()
                if a.shape[1] != g.shape[1]:
                    raise RuntimeError(f"kfac_factors: {name!r} has {a.shape[1]} patches, {g.shape[1]} outputs")
                if module.bias is not None:
                    a = torch.cat([a, a.new_ones(a.shape[:2] + (1,))], dim=2)
                a, g, positions = a.reshape(-1, a.shape[2]), g.reshape(-1, g.shape[2]), g.shape[1]
                A[name] = A.get(name, 0) + a.T @ a / positions
                S[name] = S.get(name, 0) + g.T @ g
            count += x.shape[0]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if count == 0:
        raise ValueError("kfac_factors: no examples in batches")
    return {n: KroneckerFactors(A[n] / count, S[n] / count, modules[n].bias is not None, count) for n in layers}
