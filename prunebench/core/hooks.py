"""Looking inside a forward pass: hooks on some modules while a block of code runs."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Tuple

from torch import nn


@contextmanager
def hooked(hooks: Iterable[Tuple[nn.Module, Callable]], pre: bool = False) -> Iterator[None]:
    """Each (module, hook) registered as a forward hook (`pre`: a forward pre-hook) inside the
    block, and removed when it ends, whatever ends it (an exception that stops the pass too)."""
    register = nn.Module.register_forward_pre_hook if pre else nn.Module.register_forward_hook
    handles = [register(module, fn) for module, fn in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
