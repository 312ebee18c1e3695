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
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap

Batch = Tuple[Tensor, Tensor]


def _split(model: nn.Module, names: List[str]):
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    chosen = {n: params[n] for n in names}
    return params, buffers, chosen


def _one_output(model, params, buffers, chosen, x):
    return functional_call(model, ({**params, **chosen}, buffers), (x.unsqueeze(0),)).squeeze(0)


def fisher_diagonal(model: nn.Module, names: List[str], batches: Iterable[Batch],
                    sample_labels: bool = False, generator: Optional[torch.Generator] = None,
                    chunk_size: Optional[int] = None) -> Dict[str, Tensor]:
    """Mean squared per-example gradient: empirical (data labels) or true Fisher (sampled labels)."""
    total, count = {}, 0
    for x, y in batches:
        if sample_labels:
            was_training = model.training
            model.eval()
            with torch.no_grad():
                probs = F.softmax(model(x), dim=1)
            model.train(was_training)
            y = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(x.device)
        grads = per_example_gradients(model, names, x, y, chunk_size)
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
                 chunk_size: Optional[int] = 16) -> Dict[str, Tensor]:
    """Exact diagonal of the Gauss-Newton matrix of the mean cross-entropy (labels unused)."""
    was_training = model.training
    model.eval()
    params, buffers, chosen = _split(model, names)

    def diag_one(sub, x):
        logits, pullback = vjp(lambda s: _one_output(model, params, buffers, s, x), sub)
        p = F.softmax(logits, dim=0)
        sqrt_p = p.sqrt()
        a = torch.diag(sqrt_p) - torch.outer(p, sqrt_p)  # H_f = a aᵀ; columns a[:, k]
        cols = vmap(pullback)(a.T)[0]  # Jᵀ a_k for every k
        return {n: c.pow(2).sum(0) for n, c in cols.items()}

    per_example = vmap(diag_one, in_dims=(None, 0), chunk_size=chunk_size)
    total = {n: torch.zeros_like(p) for n, p in chosen.items()}
    count = 0
    try:
        for x, _ in batches:
            diag = per_example(chosen, x)
            for n in names:
                total[n] += diag[n].sum(0)
            count += x.shape[0]
    finally:
        model.train(was_training)
    return {n: t / count for n, t in total.items()}


def hutchinson_diagonal(model: nn.Module, names: List[str], batches: Iterable[Batch], probes: int,
                        generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
    """diag(H) of the mean loss over the batches, estimated by E[z ⊙ Hz] with Rademacher z."""
    was_training = model.training
    model.eval()
    named = dict(model.named_parameters())
    weights = [named[n] for n in names]
    batches = list(batches)
    count = sum(x.shape[0] for x, _ in batches)
    try:
        loss = sum(F.cross_entropy(model(x), y, reduction="sum") for x, y in batches) / count
        grads = torch.autograd.grad(loss, weights, create_graph=True)
        total = [torch.zeros_like(w) for w in weights]
        for _ in range(probes):
            zs = [(torch.randint(0, 2, w.shape, generator=generator) * 2 - 1).to(w) for w in weights]
            hz = torch.autograd.grad(grads, weights, grad_outputs=zs, retain_graph=True)
            for t, z, h in zip(total, zs, hz):
                t += z * h
    finally:
        model.train(was_training)
    return {n: (t / probes).detach() for n, t in zip(names, total)}
