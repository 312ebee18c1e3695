"""Masks over a model's prunable weights: which weights exist, and keeping pruned ones at zero.

A `Masks` is an ordered mapping from parameter name (``"fc1.weight"``) to a 0/1 tensor of the
same shape and dtype as the weight. It works on any ``nn.Module``; by default the prunable
weights are the ``weight`` of every Conv and Linear layer (biases and norm layers are not), or
of those the model names by a ``prunable_modules()`` method.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional

import torch
from torch import Tensor, nn

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# the batch norms' base class: SyncBatchNorm (train.sync_bn) and every BatchNormNd
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def prunable_weights(model: nn.Module, types=PRUNABLE_TYPES, biases: bool = False,
                     norm: bool = False) -> Dict[str, nn.Parameter]:
    """Name -> parameter of the prunable set, in module order (first layer first).

    The weights of Conv/Linear layers; with `biases` their biases too, with `norm` the affine
    parameters of normalisation layers. A model with a `prunable_modules()` method (the ViTs)
    names the only modules that count.
    """
    declared = set(model.prunable_modules()) if hasattr(model, "prunable_modules") else None
    out = {}
    for name, m in model.named_modules():
        if declared is not None and name not in declared:
            continue
        prefix = f"{name}." if name else ""
        if isinstance(m, types):
            out[prefix + "weight"] = m.weight
            if biases and m.bias is not None:
                out[prefix + "bias"] = m.bias
        elif norm and isinstance(m, NORM_TYPES):
            for p in ("weight", "bias"):
                if getattr(m, p, None) is not None:
                    out[prefix + p] = getattr(m, p)
    return out


class Masks:
    def __init__(self, masks: Dict[str, Tensor]):
        self._masks = dict(masks)

    @classmethod
    def ones(cls, model: nn.Module, types=PRUNABLE_TYPES, biases: bool = False, norm: bool = False) -> "Masks":
        """Dense masks over the prunable set (see `prunable_weights`)."""
        return cls({n: torch.ones_like(w, memory_format=torch.contiguous_format).detach()
                    for n, w in prunable_weights(model, types, biases, norm).items()})

    @classmethod
    def from_model(cls, model: nn.Module, types=PRUNABLE_TYPES) -> "Masks":
        """Masks that keep exactly the nonzero weights a model has now."""
        return cls({n: (w.detach() != 0).to(w.dtype) for n, w in prunable_weights(model, types).items()})

    # mapping protocol ---------------------------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def names(self) -> List[str]:
        return list(self._masks)

    def items(self):
        return self._masks.items()

    # counts --------------------------------------------------------------------------------
    def kept(self, name: str) -> int:
        return int(self._masks[name].count_nonzero())

    def numel(self) -> int:
        return sum(m.numel() for m in self._masks.values())

    def sparsity(self) -> float:
        """Fraction of masked-out entries (what the masks say; see metrics for the weights)."""
        total = self.numel()
        return 1.0 - sum(self.kept(n) for n in self) / total if total else 0.0

    def is_dense(self) -> bool:
        return all(bool(m.all()) for m in self._masks.values())

    # enforcement ---------------------------------------------------------------------------
    def bind(self, model: nn.Module) -> "BoundMasks":
        return BoundMasks(self, model)

    def apply(self, model: nn.Module) -> None:
        """Zero the pruned weights of `model` in place."""
        self.bind(model).zero_weights()

    def to(self, device) -> "Masks":
        return Masks({n: m.to(device) for n, m in self._masks.items()})

    # save / load / export ------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Tensor]:
        return {n: m.detach().to("cpu", torch.bool) for n, m in self._masks.items()}

    def save(self, path) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path, model: Optional[nn.Module] = None) -> "Masks":
        state = torch.load(path, map_location="cpu", weights_only=True)
        if model is None:
            return cls({n: m.float() for n, m in state.items()})
        weights = dict(model.named_parameters())
        return cls({n: m.to(weights[n].device, weights[n].dtype) for n, m in state.items()})

    def to_torch_prune(self, model: nn.Module) -> None:
        """Attach these masks with torch.nn.utils.prune (weight_orig + weight_mask buffers)."""
        from torch.nn.utils import prune

        modules = dict(model.named_modules())
        for name, mask in self._masks.items():
            module_name, _, param = name.rpartition(".")
            prune.custom_from_mask(modules[module_name], param, mask)


class BoundMasks:
    """Masks tied to one model's parameter tensors, for enforcement during training.

    The training loop zeros the pruned weights once, then multiplies the pruned gradients to
    zero before every optimizer step. With the optimizer's state starting at zero (a fresh
    optimizer per phase), that keeps pruned weights exactly zero: SGD's momentum buffer, L2
    weight decay (wd·0) and Adam's moments all stay 0 there, so each update is exactly 0.
    `check_weights` verifies it after every epoch and raises if any pruned weight moved. (A
    second multiply of the weights after every step would cost another ~3.5% of an epoch on
    CPU for LeNet-300-100: measured, see scripts/bench_train.py.)
    """

    def __init__(self, masks: Masks, model: nn.Module):
        params = dict(model.named_parameters())
        missing = [n for n in masks if n not in params]
        if missing:
            raise KeyError(f"masks name parameters the model does not have: {missing}")
        self.names: List[str] = [n for n in masks if not bool(masks[n].all())]
        self.params: List[Tensor] = [params[n] for n in self.names]
        # same dtype, device and memory layout (e.g. channels_last) as the parameter
        self.masks: List[Tensor] = [torch.empty_like(p).copy_(masks[n]) for n, p in zip(self.names, self.params)]

    @torch.no_grad()
    def zero_weights(self) -> None:
        if self.params:
            torch._foreach_mul_(self.params, self.masks)

    @torch.no_grad()
    def check_weights(self) -> None:
        """Raise if a pruned weight is nonzero (an optimizer that moved it)."""
        for name, p, m in zip(self.names, self.params, self.masks):
            if bool(((p != 0) & (m == 0)).any()):
                raise RuntimeError(f"pruned weights of {name} are nonzero: something (an optimizer "
                                   f"that moves weights with zero gradient?) revived them")

    @torch.no_grad()
    def zero_grads(self) -> None:
        grads, masks = [], []
        for p, m in zip(self.params, self.masks):
            if p.grad is not None:
                grads.append(p.grad)
                masks.append(m)
        if grads:
            torch._foreach_mul_(grads, masks)
