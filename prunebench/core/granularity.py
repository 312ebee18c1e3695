"""What a pruning decision removes: single weights, or whole units (filters / channels).

A granularity names the *owners* of groups (mask names), reduces weight-shaped scores to one
score per group, and turns a keep decision per group back into masks. Selection (select.py)
only sees groups, so a new granularity is a class here, not a change to selection.

Structured granularities count *units*: one unit is an output channel of a producer layer
with everything that depends on it (see structure.py). `filter` scores a unit by the
producer's weight row (Li et al. 2017), `channel` by the input columns of the layers that read
it. Either way the whole unit goes, so the masks stay those of a network that compacts
exactly. A criterion that scores units directly returns one value per unit (a 1-D tensor).

`width`, `heads` and `mlp` remove a transformer's attention heads and MLP hidden channels. A
language model's are chosen and removed by lm/structured.py; a ViT's go through selection here
like filters (`TransformerUnits`), except that they count their weights, not 1 per unit.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Type

import torch
from torch import Tensor, nn

from ..config import LM_STRUCTURES, ConfigError, GranularityConfig
from .masks import Masks
from .structure import DeclaredStructure, Structure


class Granularity:
    name: str = ""
    structured: bool = False
    # True when a weight competes only within its own small block (N:M), never across a layer
    local: bool = False

    def __init__(self, cfg: GranularityConfig):
        self.cfg = cfg

    def bind(self, model: nn.Module, input_shape) -> None:
        """Learn the model's structure (structured granularities); runs before any training."""

    def owners(self, masks: Masks) -> List[str]:
        """Mask names that own groups, in layer order."""
        raise NotImplementedError

    def group_count(self, name: str, masks: Masks) -> int:
        raise NotImplementedError

    def group_size(self, name: str, masks: Masks) -> int:
        """What one group counts for in `target` (weights, or 1 per unit)."""
        raise NotImplementedError

    def total(self, masks: Masks) -> int:
        """What `target` is a fraction of: all prunable weights, or all units."""
        raise NotImplementedError

    def group_scores(self, name: str, scores: Dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def alive(self, name: str, masks: Masks) -> Tensor:
        """Bool per group: False where the group is already pruned."""
        raise NotImplementedError

    def assemble(self, keep: Dict[str, Tensor], masks: Masks) -> Masks:
        """New masks from a bool per group for some owners; nothing pruned before comes back."""
        raise NotImplementedError

    def check_plan(self, targets: list, masks: Masks) -> None:
        """Raise ConfigError for round targets this granularity cannot produce (before any training)."""

    def verify(self, masks: Masks, weights: Dict[str, Tensor], target) -> None:
        """Raise PatternError where the masks or the weights break the pattern of a round at `target`."""

    def describe(self, masks: Masks) -> Dict:
        """What summary.json records about how this granularity applied to the model."""
        return {}


class Unstructured(Granularity):
    name = "unstructured"

    def __init__(self, cfg: Optional[GranularityConfig] = None):
        super().__init__(cfg or GranularityConfig(name="unstructured", reduce="none"))
        if self.cfg.reduce != "none":
            raise ConfigError(f"granularity.reduce={self.cfg.reduce} applies to filter/channel pruning; "
                              f"unstructured ranks single weights (leave it at none)")

    def owners(self, masks: Masks) -> List[str]:
        return masks.names()

    def group_count(self, name: str, masks: Masks) -> int:
        return masks[name].numel()

    def group_size(self, name: str, masks: Masks) -> int:
        return 1

    def total(self, masks: Masks) -> int:
        return masks.numel()

    def group_scores(self, name: str, scores: Dict[str, Tensor]) -> Tensor:
        return scores[name].reshape(-1)

    def alive(self, name: str, masks: Masks) -> Tensor:
        return masks[name].reshape(-1) != 0

    def assemble(self, keep: Dict[str, Tensor], masks: Masks) -> Masks:
        # selection never keeps a weight already pruned (it scores -inf): `keep` is the mask
        out = {}
        for n, old in masks.items():
            out[n] = keep[n].reshape(old.shape).to(old.device, old.dtype) if n in keep else old.clone()
        return Masks(out)


class PatternError(RuntimeError):
    """Masks or weights that break their granularity's pattern (a bug, never a user error)."""


class NM(Unstructured):
    """N:M semi-structured sparsity: every block of M consecutive weights along a layer's input
    dimension (a Conv filter's flattened in_channels·kh·kw) keeps its N best-scored weights.

    Weight tensors are row-major (out, in, kh, kw), so those blocks are the consecutive runs of M
    in the flattened tensor. Only the layers whose input size is a multiple of M take part; the
    others are left dense and recorded (or refused: indivisible=error). A round at target s
    removes floor(s·M) of every M; the last round must reach 1 − N/M exactly."""

    name = "nm"
    local = True

    def __init__(self, cfg: GranularityConfig):
        Granularity.__init__(self, cfg)
        self.n, self.m = cfg.n, cfg.m

    def left_dense(self, masks: Masks) -> Dict[str, str]:
        """Prunable tensors that no N:M block covers, with why."""
        out = {}
        for name, mask in masks.items():
            if mask.dim() < 2:
                out[name] = "not a weight matrix"
            elif mask[0].numel() % self.m:
                out[name] = f"input size {mask[0].numel()} is not a multiple of m={self.m}"
        return out

    def owners(self, masks: Masks) -> List[str]:
        dense = self.left_dense(masks)
        return [n for n in masks.names() if n not in dense]

    def total(self, masks: Masks) -> int:
        return sum(masks[n].numel() for n in self.owners(masks))

    def pruned_per_block(self, target: float) -> int:
        """Never beyond the schedule's target: floor(s·M) of every M (the last round's is exact)."""
        return int(math.floor(target * self.m + 1e-9))

    def keep_in_blocks(self, g: Tensor, pruned: int) -> Tensor:
        """Bool per weight, True = kept: the `pruned` lowest of every block of M go (ties: the first
        in position), and what was pruned before (-inf) stays pruned."""
        blocks = g.reshape(-1, self.m)
        keep = torch.ones_like(blocks, dtype=torch.bool)
        if pruned:
            lowest = torch.argsort(blocks, dim=1, stable=True)[:, :pruned]
            keep.scatter_(1, lowest, False)
        return (keep & ~torch.isneginf(blocks)).reshape(-1)

    def check_plan(self, targets: list, masks: Masks) -> None:
        dense = {n: why for n, why in self.left_dense(masks).items() if why != "not a weight matrix"}
        if not self.owners(masks) or (dense and self.cfg.indivisible == "error"):
            hint = " (granularity.indivisible=dense leaves such layers dense)" if self.owners(masks) else ""
            raise ConfigError(f"granularity=nm {self.n}:{self.m} cannot apply to "
                              f"{'; '.join(f'{n}: {w}' for n, w in dense.items()) or 'any prunable layer'}{hint}")
        if any(not isinstance(t, float) for t in targets):
            raise ConfigError("granularity=nm prunes the same fraction of every block: criterion.layer_rates and "
                              "criterion.scope=stage do not apply")

    def verify(self, masks: Masks, weights: Dict[str, Tensor], target: float) -> None:
        allowed = self.m - self.pruned_per_block(target)
        for name in self.owners(masks):
            for what, t in (("mask", masks[name]), ("weights", weights[name])):
                most = int((t.detach().reshape(-1, self.m) != 0).sum(1).max())
                if most > allowed:
                    raise PatternError(f"{name}'s {what} keep {most} of a block of {self.m}, more than "
                                       f"{allowed} at sparsity {target:g}")

    def describe(self, masks: Masks) -> Dict:
        owners = self.owners(masks)
        kept = sum(int(masks[n].count_nonzero()) for n in owners)
        return {"n": self.n, "m": self.m, "layers": owners, "left_dense": self.left_dense(masks),
                "sparsity_in_layers": 1.0 - kept / max(1, self.total(masks))}


REDUCTIONS = {
    "l1": lambda s: s.abs().sum(dim=1),
    "l2": lambda s: s.pow(2).sum(dim=1),  # squared; the square root is taken after summing consumers
    "sum": lambda s: s.sum(dim=1),
}


class _Units(Granularity):
    structured = True
    structure: Structure

    def __init__(self, cfg: GranularityConfig):
        super().__init__(cfg)
        if cfg.reduce not in REDUCTIONS:
            raise ConfigError(f"granularity.reduce={cfg.reduce} is not one of: {', '.join(REDUCTIONS)} "
                              f"(how weight scores become one score per {self.name})")

    def bind(self, model: nn.Module, input_shape) -> None:
        self.structure = Structure.of(model, input_shape)
        if not self.structure.producers:
            raise ConfigError(f"granularity={self.name}: no layer of this model has channels that can be "
                              f"removed ({'; '.join(f'{k}: {v}' for k, v in self.structure.skipped.items())})")

    def owners(self, masks: Masks) -> List[str]:
        return [w for w in self.structure.producers if w in masks]

    def group_count(self, name: str, masks: Masks) -> int:
        return self.structure.producers[name].units

    def group_size(self, name: str, masks: Masks) -> int:
        return 1

    def total(self, masks: Masks) -> int:
        return sum(p.units for p in self.structure.producers.values())

    def group_scores(self, name: str, scores: Dict[str, Tensor]) -> Tensor:
        units = self.structure.producers[name].units
        own = scores.get(name)
        if own is not None and own.dim() == 1 and own.numel() == units:
            return own  # the criterion scored units itself
        parts = self._parts(name, scores)
        g = sum(REDUCTIONS[self.cfg.reduce](p.reshape(units, -1).to(torch.float64)) for p in parts)
        return g.sqrt() if self.cfg.reduce == "l2" else g

    def _parts(self, name: str, scores: Dict[str, Tensor]) -> List[Tensor]:
        raise NotImplementedError

    def alive(self, name: str, masks: Masks) -> Tensor:
        return self.structure.alive(name, masks[name])

    def assemble(self, keep: Dict[str, Tensor], masks: Masks) -> Masks:
        new = self.structure.unit_masks(keep, dict(masks.items()))
        return Masks({n: old * new[n] if n in new else old.clone() for n, old in masks.items()})


class Filter(_Units):
    """A unit scored by its producer's weight row: Li et al.'s filters (rows of a Linear)."""

    name = "filter"

    def _parts(self, name: str, scores: Dict[str, Tensor]) -> List[Tensor]:
        return [scores[name]]


class Channel(_Units):
    """A unit scored by the input columns that read it, in every consumer."""

    name = "channel"

    def _parts(self, name: str, scores: Dict[str, Tensor]) -> List[Tensor]:
        units = self.structure.producers[name].units
        parts = []
        for s in self.structure.producers[name].consumers():
            if s.param not in scores or scores[s.param].dim() < 2:
                raise ValueError(f"granularity=channel needs weight-shaped scores of {s.param}")
            t = scores[s.param].transpose(0, 1)  # (inputs, outputs, ...)
            parts.append(t.reshape(units, s.block, -1))
        return parts


class _Only(Granularity):
    """A granularity whose groups are only those of some owners: the rest are neither
    candidates nor counted in `total` (EigenDamage's eigen-directions among other units)."""

    def __init__(self, inner: Granularity, owners: List[str]):
        super().__init__(inner.cfg)
        self.inner, self._owners = inner, owners
        self.name, self.structured = inner.name, inner.structured

    def __getattr__(self, attr):  # structure, bind, ...
        inner = self.__dict__.get("inner")
        if inner is None:  # mid-copy or unpickling: no delegation yet
            raise AttributeError(attr)
        return getattr(inner, attr)

    def owners(self, masks: Masks) -> List[str]:
        return [n for n in self.inner.owners(masks) if n in self._owners]

    def group_count(self, name: str, masks: Masks) -> int:
        return self.inner.group_count(name, masks)

    def group_size(self, name: str, masks: Masks) -> int:
        return self.inner.group_size(name, masks)

    def group_scores(self, name: str, scores: Dict[str, Tensor]) -> Tensor:
        return self.inner.group_scores(name, scores)

    def alive(self, name: str, masks: Masks) -> Tensor:
        return self.inner.alive(name, masks)

    def assemble(self, keep: Dict[str, Tensor], masks: Masks) -> Masks:
        return self.inner.assemble(keep, masks)

    def total(self, masks: Masks) -> int:
        return sum(self.group_count(n, masks) * self.group_size(n, masks) for n in self.owners(masks))


def only(granularity: Granularity, owners: List[str]) -> Granularity:
    return _Only(granularity, owners)


class TransformerUnits(_Units):
    """Attention heads and/or MLP hidden channels (granularity=width, heads, mlp).

    Language models: only `.name` and `structured` are read; lm/structured.py chooses and removes
    the units itself. A ViT (a model with `units()`, models/vit.py): one owner per kind and block
    (blocks.i.attn.q.weight for its heads, blocks.i.mlp.fc1.weight for its channels). A head owns
    its head_dim rows of q, k, v (weights and biases) and columns of proj; a channel its fc1 row
    and bias and its fc2 column.

    `target` counts weights: a unit is worth the weights it owns, so sparsity is the fraction of
    the units' weights (attention and/or MLP weights) removed. Its score is granularity.reduce
    over those weights' scores (l1 when reduce=none, as filters) divided by their number: a
    score per weight, so that global selection compares a head with a channel at the same price
    per weight removed (within one kind every unit has the same size: the order is the reduced
    score's)."""

    def __init__(self, cfg: GranularityConfig):
        Granularity.__init__(self, cfg)
        self.name, self.kinds = cfg.name, LM_STRUCTURES[cfg.name]
        self.reduce = "l1" if cfg.reduce == "none" else cfg.reduce
        if self.reduce not in REDUCTIONS:
            raise ConfigError(f"granularity.reduce={cfg.reduce} is not one of: {', '.join(REDUCTIONS)}")

    def bind(self, model: nn.Module, input_shape) -> None:
        if not hasattr(model, "units"):
            raise ConfigError(f"granularity={self.name}: {type(model).__name__} declares no attention heads or "
                              f"MLP channels to remove (a ViT does: model=vit_tiny, vit_small)")
        for option, usual in (("allocation", "uniform"), ("attention", "groups"), ("nonuniform", "remote_code")):
            if getattr(self.cfg, option, usual) != usual:
                raise ConfigError(f"granularity.{option}={getattr(self.cfg, option)} applies to language models; a "
                                  f"ViT's units are selected by criterion.scope (global or layer)")
        kinds = getattr(model, "prune_kinds", ())
        if not all(k in kinds for k in ("attention",) * ("heads" in self.kinds) + ("mlp",) * ("mlp" in self.kinds)):
            needs = " and ".join({"heads": "attention", "mlp": "mlp"}[k] for k in self.kinds)
            raise ConfigError(f"granularity={self.name} removes {' and '.join(self.kinds)} units: model.prune must "
                              f"include {needs} (got {list(kinds)})")
        self.structure = DeclaredStructure.of_units(u for u in model.units() if u.kind in self.kinds)
        self.sizes = {w: sum(model.get_parameter(s.param).numel() // p.units for s in p.slices
                             if s.param.endswith(".weight")) for w, p in self.structure.producers.items()}

    def group_size(self, name: str, masks: Masks) -> int:
        return self.sizes[name]

    def total(self, masks: Masks) -> int:
        return sum(p.units * self.sizes[w] for w, p in self.structure.producers.items())

    def group_scores(self, name: str, scores: Dict[str, Tensor]) -> Tensor:
        producer = self.structure.producers[name]
        own = scores.get(name)
        if own is not None and own.dim() == 1 and own.numel() == producer.units:
            return own  # the criterion scored units itself
        g, count = 0, 0
        for s in producer.slices:
            if s.param in scores:  # the weights (and, with model.prune_biases, biases) scored
                part = scores[s.param].movedim(s.dim, 0).reshape(producer.units, -1).to(torch.float64)
                g, count = g + REDUCTIONS[self.reduce](part), count + part.shape[1]
        g = g / count
        return g.sqrt() if self.reduce == "l2" else g

    def check_plan(self, targets: list, masks: Masks) -> None:
        if any(not isinstance(t, float) for t in targets):
            raise ConfigError(f"granularity={self.name} on a ViT: criterion.scope=stage and criterion.layer_rates do "
                              f"not apply (its blocks are one stage); use criterion.scope=global or layer")
        owners = self.owners(masks)
        most = sum((self.structure.producers[n].units - 1) * self.sizes[n] for n in owners) / self.total(masks)
        if targets and targets[-1] > most + 1e-9:
            raise ConfigError(f"sparsity={targets[-1]:g} with granularity={self.name} would leave a block without "
                              f"{' or '.join(self.kinds)}: each block keeps at least one of each, so at most "
                              f"{most:.4g} of the units' weights can go")

    def describe(self, masks: Masks) -> Dict:
        kept = {self.structure.producers[n].module: int(self.alive(n, masks).sum()) for n in self.owners(masks)}
        return {"heads": {m.rpartition(".attn")[0]: k for m, k in kept.items() if m.endswith(".attn.q")},
                "mlp_hidden": {m.rpartition(".mlp")[0]: k for m, k in kept.items() if m.endswith(".mlp.fc1")}}


class DecoderStructure(Granularity):
    """Whole blocks of a language model's decoder (granularity=depth), or whole experts of a
    mixture of experts (granularity=experts): chosen and removed by lm/structured.py and
    lm/experts.py, never through masks and selection here."""

    structured = True

    def __init__(self, cfg: GranularityConfig):
        super().__init__(cfg)
        self.name = cfg.name


GRANULARITIES: Dict[str, Type[Granularity]] = {"unstructured": Unstructured, "nm": NM, "filter": Filter,
                                                "channel": Channel, "width": TransformerUnits,
                                                "heads": TransformerUnits, "mlp": TransformerUnits,
                                                "depth": DecoderStructure, "experts": DecoderStructure}


def build_granularity(cfg: GranularityConfig) -> Granularity:
    if cfg.name not in GRANULARITIES:
        raise ConfigError(f"granularity={cfg.name!r} is not one of: {', '.join(sorted(GRANULARITIES))}")
    return GRANULARITIES[cfg.name](cfg)
