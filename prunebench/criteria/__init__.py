"""Pruning criteria: one file each, found by name through a small registry.

A criterion turns a model into weight-shaped importance scores (higher = keep). To add one,
write `criteria/<name>.py` with a `Criterion` subclass decorated by `@register("<name>")`, then
`conf/criterion/<name>.yaml` starting from `criterion_<name>_schema`; options of its own go in
a class in config/options.py. What it needs or allows it declares as class attributes that the
checks read (`needs_trained`, `calibrates`, `granularities`, ... below; `language_models` on its
options class, read before torch loads). Nothing else changes: no name list elsewhere.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Type

import torch
from torch import Tensor, nn

from ..config import CriterionConfig
from ..core.granularity import Granularity, Unstructured
from ..core.layerwise import Stat, layer_by_layer, layer_modules
from ..core.masks import Masks
from ..config.registry import Registry
from ..core.allocation import layer_fractions
from ..core.select import SelectOptions, select_by_rank


@dataclass
class ScoreContext:
    """What a criterion may look at when it scores."""

    model: nn.Module
    masks: Masks
    round: int = 1  # 1-based pruning round
    init_state: Optional[Dict[str, Tensor]] = None  # θ0 (state_dict at initialisation)
    # (x, y) mini-batches of training data, for data-driven criteria
    batches: Optional[Callable[[], Iterator[Tuple[Tensor, Tensor]]]] = None
    generator: Optional[torch.Generator] = None  # for criteria that draw random numbers
    rounds: int = 1  # total number of rounds in the schedule
    input_shape: Optional[Tuple[int, ...]] = None  # one example's shape, e.g. (1, 28, 28)
    num_classes: Optional[int] = None
    memory: Optional[int] = None  # bytes a curvature estimate may hold at once (None: no limit)
    # the calibration inputs of layer-wise criteria: the same fixed draw at every call
    calibration: Optional[Callable[[], List[Tensor]]] = None

    def params(self) -> Dict[str, nn.Parameter]:
        """The model's masked parameters, by mask name."""
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self.masks}


@dataclass
class UnitWeights:
    """One module of a language model's decoder block as its units see it (lm/structured.py).
    Feature j is input column j of the reader (o_proj, down_proj / fc2) and row j of every writer
    (q_proj; gate_proj and up_proj / fc1); attention also has its key and value layers, whose
    output rows belong to key-value groups."""

    kind: str  # heads | mlp
    reader: nn.Linear
    writers: List[nn.Linear]
    kv: List[nn.Linear] = field(default_factory=list)  # k_proj, v_proj (heads only)
    generator: Optional[torch.Generator] = None  # for criteria that draw random numbers (seeded per run)


@dataclass
class Routed:
    """One calibration batch at a mixture of experts' block (lm/experts.py): its tokens, the
    router's gate scores, the experts each token was sent to and the weights the block gives them."""

    tokens: Tensor  # (T, hidden)
    scores: Tensor  # (T, experts) float32: every expert's gate score before the top-k (moe.gate_scores)
    index: Tensor  # (T, top_k)
    weights: Tensor  # (T, top_k)
    output: Callable[[Tensor, int], Tensor]  # (rows, expert) -> the expert's output (before its weight)
    experts: int


class Criterion:
    """Base class. `score` is the paper's formula; `select` and `compensate` have defaults.

    `prune` is what the pipeline calls: score, select, and the sanity checks of Frankle et al.
    2021 ("Pruning neural networks at initialization: why are we missing the mark?"), which
    apply to any criterion: `invert` keeps the lowest scores, `shuffle` keeps each layer's
    number of survivors but places them at random.
    """

    name: str = ""
    # True when the criterion decides how much to prune (a threshold) instead of a target
    sets_own_sparsity: bool = False
    # what it can prune: its scores reduce to filters/channels unless it says otherwise
    granularities: Tuple[str, ...] = ("unstructured", "nm", "filter", "channel")
    # True when `reparameterize` swaps in another network (one round, retrain=retain only)
    changes_architecture: bool = False
    # True when its pruning rewrites the surviving weights layer by layer after training
    # (SparseGPT): not inside a training run
    reconstructs: bool = False
    # True when it reads the calibration inputs (ScoreContext.calibration)
    calibrates: bool = False
    # False when its selection cannot take a sparsity per layer (criterion.layer_rates)
    layer_targets: bool = True
    # True when its scores on an untrained network mean nothing (or it decides the sparsity
    # itself): it cannot choose a mask at initialisation (schedule=dynamic schedule.init=criterion)
    needs_trained: bool = False

    # language models' structures: True when it reads the gradients of the calibration loss
    needs_gradients: bool = False

    def __init__(self, cfg: CriterionConfig):
        self.cfg = cfg

    def validate(self, model: nn.Module, masks: Masks) -> None:
        """Raise ConfigError for options that do not fit this model (runs before any training)."""

    def memory_need(self, model: nn.Module, masks: Masks, num_classes: int) -> Optional[Tuple[int, str]]:
        """The least memory (bytes) its scoring must hold at once beyond the model's own, and what
        holds it; None when that is not more than a training step takes. Checked against the
        memory budget before any training (runs/experiment.check_memory)."""

    def reparameterize(self, ctx: ScoreContext, target: Optional[float] = None) -> Optional[nn.Module]:
        """A network computing the same function in the basis this criterion prunes in, or None
        to prune the network as it is (only EigenDamage changes the basis)."""

    def score(self, ctx: ScoreContext) -> Dict[str, Tensor]:
        raise NotImplementedError

    def prune(self, ctx: ScoreContext, target: Optional[float],
              granularity: Granularity = Unstructured()) -> Masks:
        masks = self.select(self.score(ctx), ctx, target, granularity)
        if self.cfg.sanity == "shuffle":
            masks = shuffle_within_layers(masks, ctx.masks, ctx.generator)
        return masks

    def select(self, scores: Dict[str, Tensor], ctx: ScoreContext, target: float,
               granularity: Granularity = Unstructured()) -> Masks:
        return self.rank(scores, ctx.masks, target, granularity)

    def rank(self, scores: Dict[str, Tensor], masks: Masks, target: float,
             granularity: Granularity = Unstructured()) -> Masks:
        """Keep the highest scores (the lowest with sanity=invert) so that `target` is reached."""
        if self.cfg.sanity == "invert":
            scores = {n: -s for n, s in scores.items()}
        return select_by_rank(scores, masks, target, SelectOptions.of(self.cfg), granularity)

    def compensate(self, model: nn.Module, masks: Masks, ctx: ScoreContext) -> Optional[Dict]:
        """Update the surviving weights for the new masks, from the still unmasked weights (only
        OBS-type methods do); may return figures for the round's record."""

    # ---- structures of language models (granularity=width|heads|mlp; lm/structured.py)
    def unit_stat(self) -> Optional[Stat]:
        """What it gathers from a reader's input rows on the calibration windows (None: nothing)."""
        return None

    def feature_scores(self, unit: UnitWeights, stat: Optional[Stat]) -> Tensor:
        """One additive score per feature (higher = keep); a unit's score is the sum over its features."""
        raise NotImplementedError(f"criterion={self.name} does not score structures")

    def kv_scores(self, unit: UnitWeights) -> Optional[Tensor]:
        """One additive score per key/value output feature (a key-value group's share), or None."""
        return None

    def output_bias(self, unit: UnitWeights, stat: Optional[Stat], removed: Tensor) -> Optional[Tensor]:
        """What to add to the reader's output bias when the `removed` features go (None: nothing)."""
        return None


    # ---- whole experts of a mixture (granularity=experts; lm/experts.py)
    def expert_stat(self, experts: int) -> Optional[Callable[[Routed], None]]:
        """What it gathers from each calibration batch at one MoE block (None: nothing)."""
        return None

    def expert_scores(self, stat, experts: int, generator: Optional[torch.Generator]) -> Tensor:
        """One score per expert of the block (higher = keep)."""
        raise NotImplementedError(f"criterion={self.name} does not score experts")


class LayerwiseCriterion(Criterion):
    """Prunes after training, layer by layer, from each layer's inputs (Wanda, SparseGPT):
    `layer_stat` gathers what it needs from a layer's input rows, `prune_layer` prunes the layer
    from it. `prune` walks the network's layers in forward order (layerwise.layer_by_layer); a
    language model's decoder blocks are walked one at a time on the device (lm/blockwise.py)."""

    granularities = ("unstructured", "nm")
    calibrates = True

    def validate(self, model: nn.Module, masks: Masks) -> None:
        layer_modules(model, masks.names(), self.name)

    def layer_stat(self, name: str) -> Stat:
        raise NotImplementedError

    def prune_layer(self, weight: nn.Parameter, stat: Stat, mask: Tensor, fraction: float,
                    granularity: Granularity) -> Tensor:
        """Prune `weight` (in place) to `fraction` of its entries from `stat`; the new mask."""
        raise NotImplementedError

    def prune(self, ctx: ScoreContext, target, granularity: Granularity = Unstructured()) -> Masks:
        fractions = layer_fractions(target, ctx.masks, SelectOptions.of(self.cfg), granularity)
        params = ctx.params()
        new = dict(ctx.masks.items())

        def prune(name: str, stat: Stat) -> None:
            new[name] = self.prune_layer(params[name], stat, new[name], fractions[name], granularity)

        if ctx.calibration is None:
            raise ValueError(f"criterion={self.name} needs calibration inputs (ScoreContext.calibration)")
        modules = layer_modules(ctx.model, list(fractions), self.name)
        layer_by_layer(ctx.model, modules, ctx.calibration(), self.cfg.sequential, self.layer_stat, prune,
                       self.cfg.sequential_unit)
        return Masks(new)


class DepthCriterion(Criterion):
    """Scores whole decoder blocks of a language model from the hidden states that enter and leave
    each block on the calibration windows (granularity=depth; lm/structured.py)."""

    granularities = ("depth",)
    calibrates = True
    layer_targets = False

    def observe(self, index: int, inputs: List[Tensor], outputs: List[Tensor]) -> None:
        """Block `index`'s input and output hidden states, one tensor per calibration batch."""
        raise NotImplementedError

    def blocks_to_remove(self, n: int, blocks: int) -> List[int]:
        raise NotImplementedError


CRITERIA = Registry("criterion")


def register(name: str):
    """Class decorator: make a criterion available as `criterion=<name>` (its options: options.py)."""

    def wrap(cls: Type[Criterion]) -> Type[Criterion]:
        CRITERIA.register(name)(cls)
        cls.name = name
        cls.config_class = CRITERIA.options(name)
        return cls

    return wrap


def build_criterion(cfg: CriterionConfig) -> Criterion:
    return CRITERIA.get(cfg.name)(cfg)


@torch.no_grad()
def shuffle_within_layers(new: Masks, old: Masks, generator: Optional[torch.Generator]) -> Masks:
    """Each layer keeps as many weights as `new` does, at random places among those alive in `old`."""
    out = {}
    for n, mask in new.items():
        alive = (old[n].reshape(-1) != 0).nonzero().squeeze(1)
        kept = int(mask.count_nonzero())
        pick = torch.randperm(alive.numel(), generator=generator)[:kept].to(alive.device)
        flat = torch.zeros_like(mask).reshape(-1)
        flat[alive[pick]] = 1
        out[n] = flat.reshape(mask.shape)
    return Masks(out)


def weights_of(model: nn.Module, masks: Masks) -> Dict[str, Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach() for n in masks}


# import every module in this package so each registers itself
for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
