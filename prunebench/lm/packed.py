"""Masks of a language model packed to one bit per weight, for fine-tuning.

A bool mask costs a byte per weight and a mask in the weights' dtype two or four (7B weights:
7 to 28 GB); packed, a 7B model's masks take under 1 GB. A layer's mask is unpacked only while it is used:
to zero that layer's pruned gradients before an optimizer step, and to check its pruned weights
are still zero. The packed bits mark the pruned weights (1 = pruned), so unpacking gives the
mask that `masked_fill_` and the check want without a second temporary.
"""

from __future__ import annotations

import functools
from typing import Dict, Iterable, List, Tuple

import torch
from torch import Tensor, nn

# bit k of a byte holds the k-th of its 8 weights
SHIFTS = torch.arange(8, dtype=torch.uint8)


@functools.lru_cache(maxsize=None)
def shifts_on(device: torch.device) -> Tensor:
    """SHIFTS on `device`, made once (unpacking runs per layer per step: no copy to the GPU each time)."""
    return SHIFTS.to(device)


def pack(bits: Tensor) -> Tensor:
    """A bool tensor as uint8, 8 of its entries (flattened) per byte; the last byte padded with 0."""
    flat = bits.reshape(-1)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, 8).to(torch.uint8) << shifts_on(flat.device)
    return groups.sum(1, dtype=torch.uint8)  # distinct bits: the sum is their OR


def unpack(packed: Tensor, shape: Tuple[int, ...]) -> Tensor:
    """The bool tensor of `shape` that `pack` packed."""
    numel = 1
    for n in shape:
        numel *= n
    bits = (packed.unsqueeze(1) >> shifts_on(packed.device)) & 1
    return bits.view(-1)[:numel].view(shape).bool()


class PackedMasks:
    """The pruned weights of named parameters, one bit each, on the parameters' device.

    Used with fp32 master weights and a fresh optimizer: a pruned weight starts at 0, its
    gradient is zeroed before every step, so Adam's moments stay 0 there and its update is 0
    (decoupled weight decay scales 0 to 0)."""

    def __init__(self, params: Dict[str, nn.Parameter]):
        self.params = params
        self.shapes = {n: tuple(p.shape) for n, p in params.items()}
        self.bits = {n: pack(p.detach() == 0) for n, p in params.items()}  # one layer's bool at a time

    @classmethod
    def of_zeros(cls, model: nn.Module, names: Iterable[str]) -> "PackedMasks":
        """The weights that are zero now count as pruned (a pruned model's zeros are its masks)."""
        params = dict(model.named_parameters())
        return cls({n: params[n] for n in names})

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.bits.values())

    def pruned(self, name: str) -> Tensor:
        return unpack(self.bits[name], self.shapes[name])

    @torch.no_grad()
    def zero_grads(self) -> None:
        for name, p in self.params.items():
            if p.grad is not None:
                p.grad.masked_fill_(self.pruned(name), 0)  # fill, not multiply: an inf gradient becomes 0 too

    @torch.no_grad()
    def revived(self) -> List[str]:
        """The layers where a pruned weight is no longer zero."""
        return [n for n, p in self.params.items() if bool(p[self.pruned(n)].any())]

    def check_weights(self) -> None:
        revived = self.revived()
        if revived:
            raise RuntimeError(f"pruned weights of {', '.join(revived[:3])} are nonzero: something (an optimizer "
                               f"that moves weights with zero gradient?) revived them")
