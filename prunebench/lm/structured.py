"""Structured pruning of a language model's decoder blocks, top to bottom:

    width (granularity=width|heads|mlp):
      [taylor: the calibration loss's gradients] → for each block on the device: its readers'
      statistics on the calibration windows → one score per unit (criterion.feature_scores
      summed over the unit) → uniform: this block's units chosen now and masked, its outputs
      computed by the masked block for the next | global: after every block, all units ranked
      together (FLAP's standardised scores weighed by parameters) → compensation biases
      → the removed model checked against the masked one on a calibration window
    depth (granularity=depth): every block's input and output hidden states on the calibration
      windows → criterion.blocks_to_remove → the blocks go.
    experts (granularity=experts): lm/experts.py.

Units: a head unit is a key-value group (granularity.attention=groups: its key and value heads
with the query heads that read them) or a query-head "slice" (attention=query: one query head
from every group, the lowest-scored left in each, so every group keeps as many and the ratio
stays an integer); an MLP unit is a channel. What `sparsity` counts: the Linear weights of the
decoder blocks that the granularity touches (width: attention and MLP; heads; mlp), the same
weights unstructured pruning counts; depth: whole blocks.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..config import Config, ConfigError
from ..core.hooks import hooked
from ..criteria import Criterion, DepthCriterion, UnitWeights
from . import experts, structure
from .blockwise import block_outputs, call_block, catch_inputs, move_outside_blocks
from .hub import decoder_blocks

MODULES = {"width": ("heads", "mlp"), "heads": ("heads",), "mlp": ("mlp",)}


# ------------------------------------------------------------------------------ what a unit costs
@dataclass
class UnitCosts:
    """Units per block and the Linear weights each holds, from the model's config alone."""

    attention_units: int
    attention_unit_params: int
    channels: int
    channel_params: int
    attention_params: int  # q, k, v and o: with attention=query, k and v are not removable but count

    @classmethod
    def of(cls, sizes: Dict, writers: int, attention: str) -> "UnitCosts":
        hidden, head_dim, heads, kv = sizes["hidden"], sizes["head_dim"], sizes["heads"], sizes["kv_heads"]
        group = heads // kv
        if attention == "groups":  # q rows and o columns of the group's heads, its k and v rows
            units, per_unit = kv, head_dim * hidden * (2 * group + 2)
        else:  # a slice: one query head's q rows and o columns in every group
            units, per_unit = group, kv * head_dim * hidden * 2
        return cls(units, per_unit, sizes["channels"], (writers + 1) * hidden, hidden * head_dim * 2 * (heads + kv))

    def params(self, module: str) -> int:
        """The module's Linear weights in one block."""
        return self.attention_params if module == "heads" else self.channels * self.channel_params

    def units(self, module: str) -> Tuple[int, int]:
        """(units per block, weights per unit)."""
        return ((self.attention_units, self.attention_unit_params) if module == "heads"
                else (self.channels, self.channel_params))


def uniform_counts(sparsity: float, kind: str, costs: UnitCosts) -> Dict[str, int]:
    """Units removed from every block: the heads rounded to whole units without passing the
    target, the MLP channels making up the rest (width); ConfigError where a block would lose
    every unit of a module."""
    modules = MODULES[kind]
    target = sparsity * sum(costs.params(m) for m in modules)
    counts = {}
    if "heads" in modules:  # the attention's share as close as whole units allow, within the target
        units, per_unit = costs.units("heads")
        removed = round(sparsity * costs.params("heads") / per_unit)
        # width: at least one unit stays, and the MLP makes up the rest where it can
        counts["heads"] = removed if kind == "heads" else min(removed, int(target // per_unit), units - 1)
        target -= counts["heads"] * per_unit
    if "mlp" in modules:
        counts["mlp"] = max(0, round(target / costs.channel_params))
    for module, removed in counts.items():
        units = costs.units(module)[0]
        if removed >= units:
            what = "attention units" if module == "heads" else "MLP channels"
            raise ConfigError(f"sparsity={sparsity:g} with granularity={kind} removes {removed} of the {units} "
                              f"{what} of every block: at least one must stay (lower the sparsity"
                              f"{', or granularity=width' if kind != 'width' else ''})")
    return counts


def check_plan(cfg: Config, hf_config) -> None:
    """Everything the config and the model's config decide, before any weights load."""
    kind = cfg.granularity.name
    if kind == "experts":
        return experts.check_plan(cfg, hf_config)
    structure.family(hf_config)
    sizes = structure.sizes(hf_config)
    if kind == "depth":
        blocks_to_drop(cfg.sparsity, sizes["layers"])
        return
    if sizes["heads"] % sizes["kv_heads"]:
        raise ConfigError(f"{sizes['heads']} query heads do not divide into {sizes['kv_heads']} key-value groups")
    costs = UnitCosts.of(sizes, writers(hf_config), cfg.granularity.attention)
    if cfg.granularity.allocation == "uniform":
        uniform_counts(cfg.sparsity, kind, costs)
    else:
        keep_one = sum(costs.units(m)[1] for m in MODULES[kind])
        total = sum(costs.params(m) for m in MODULES[kind])
        if cfg.sparsity * total > total - keep_one:
            raise ConfigError(f"sparsity={cfg.sparsity:g}: every block must keep at least one unit of each module")


def writers(hf_config) -> int:
    """Layers that write an MLP channel: gate and up (LLaMA-like), fc1 (OPT)."""
    return 2 if structure.family(hf_config) == "llama" else 1


def blocks_to_drop(sparsity: float, layers: int) -> int:
    n = round(sparsity * layers)
    if n < 1 or n >= layers:
        raise ConfigError(f"sparsity={sparsity:g} of {layers} decoder blocks rounds to {n} blocks to remove: "
                          f"granularity=depth removes at least 1 and keeps at least 1 (sparsity between "
                          f"{0.5 / layers:.3g} and {(layers - 0.5) / layers:.3g})")
    return n


# ------------------------------------------------------------------------------ the run
def prune_structures(model: nn.Module, criterion: Criterion, cfg: Config, calibration: Optional[Tensor],
                     device: torch.device, between_blocks=lambda: None) -> Dict:
    """Removes the units (or blocks) `cfg` asks for from `model`, in place; returns the figures
    the run records."""
    started = time.perf_counter()
    if cfg.granularity.name == "experts":
        figures = experts.prune_experts(model, criterion, cfg, calibration, device, between_blocks)
        return {"score_seconds": time.perf_counter() - started, **figures}
    if cfg.granularity.name == "depth":
        figures = prune_depth(model, criterion, cfg, calibration, device)
    else:
        figures = prune_width(model, criterion, cfg, calibration, device, between_blocks)
    return {"score_seconds": time.perf_counter() - started, **figures,
            "blocks": structure.block_sizes(model)}


def prune_depth(model: nn.Module, criterion: DepthCriterion, cfg: Config, calibration: Tensor,
                device: torch.device) -> Dict:
    _, blocks = decoder_blocks(model)
    count = len(blocks)
    for index, inputs, outputs in dense_block_passes(model, calibration, cfg.calibration.batch_size, device):
        criterion.observe(index, inputs, outputs)
    drop = criterion.blocks_to_remove(blocks_to_drop(cfg.sparsity, count), count)
    structure.remove_blocks(model, drop)
    return {"blocks_removed": drop, "units_removed": len(drop) / count}


def dense_block_passes(model: nn.Module, calibration: Tensor, batch_size: int, device: torch.device):
    """(index, inputs, outputs) of every block on the calibration windows, one block on the device at a time."""
    _, blocks = decoder_blocks(model)
    move_outside_blocks(model, blocks, device)
    inputs = catch_inputs(model, blocks, calibration, batch_size, device)
    for index, block in enumerate(blocks):
        block.to(device)
        outputs = block_outputs(block, inputs)
        block.to("cpu")
        yield index, [x for x, _ in inputs], [x for x, _ in outputs]
        inputs = outputs
    move_outside_blocks(model, blocks, torch.device("cpu"))


# ------------------------------------------------------------------------------ width
Keep = Dict[str, Tensor]  # module -> bool per query head (heads) or per channel (mlp)


@dataclass
class BlockScores:
    units: Dict[str, UnitWeights]
    stats: Dict[str, object]
    scores: Dict[str, Tensor]  # heads: per key-value group or per query head (attention=query); mlp: per channel


def prune_width(model: nn.Module, criterion: Criterion, cfg: Config, calibration: Optional[Tensor],
                device: torch.device, between_blocks) -> Dict:
    gran, modules = cfg.granularity, MODULES[cfg.granularity.name]
    parts = structure.layout(model)
    costs = UnitCosts.of(structure.sizes(model.config), writers(model.config), gran.attention)
    counts = uniform_counts(cfg.sparsity, gran.name, costs) if gran.allocation == "uniform" else None
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    if criterion.needs_gradients:
        by_block = getattr(criterion.cfg, "gradients", "model") == "blocks"
        (gradients_block_by_block if by_block else accumulate_gradients)(model, calibration,
                                                                         cfg.calibration.batch_size, device)
    keeps: List[Keep] = []

    def decide(index: int, scored: BlockScores) -> None:  # uniform: this block now, before the next one's inputs
        keeps.append(uniform_keep(parts[index], scored, counts, gran.attention))
        mask_block(parts[index], keeps[-1], scored, criterion)

    scored = [score_block(p, criterion, modules, gran.attention, generator, stats=None) for p in parts] \
        if criterion.unit_stat() is None else None
    if scored is None:
        scored = walk_blocks(model, parts, criterion, modules, gran.attention, generator, calibration,
                             cfg.calibration.batch_size, device, decide if counts else None, between_blocks)
    elif counts:
        for index, block_scores in enumerate(scored):
            decide(index, block_scores)
    if not counts:
        keeps = global_keep(parts, scored, costs, cfg.sparsity, modules, gran.attention)
        for p, keep, block_scores in zip(parts, keeps, scored):
            mask_block(p, keep, block_scores, criterion)
    clear_gradients(model)
    difference = remove_checked(model, parts, keeps, calibration, device)
    removed = {m: sum(int((~k[m]).sum()) for k in keeps) for m in modules}
    return {"allocation": gran.allocation, "attention": gran.attention, "units_removed_per_module": removed,
            "units_removed": unit_fraction(parts, keeps, modules), "check_max_abs_difference": difference,
            "sequential": bool(counts) and criterion.unit_stat() is not None and sequential_of(criterion)}


def sequential_of(criterion: Criterion) -> bool:
    return getattr(criterion.cfg, "sequential", True)


def unit_fraction(parts, keeps: List[Keep], modules) -> float:
    total = sum(k[m].numel() for k in keeps for m in modules)
    return sum(int((~k[m]).sum()) for k in keeps for m in modules) / total


def unit_weights(p: "structure.BlockParts", generator: torch.Generator) -> Dict[str, UnitWeights]:
    a, mlp = p.attention, p.mlp
    return {"heads": UnitWeights("heads", a.o, [a.q], [a.k, a.v], generator),
            "mlp": UnitWeights("mlp", mlp.reader, list(mlp.writers), [], generator)}


def score_block(p: "structure.BlockParts", criterion: Criterion, modules, attention: str,
                generator: torch.Generator, stats: Optional[Dict]) -> BlockScores:
    """One score per unit of each module: the criterion's feature scores summed over the unit."""
    units, stats = unit_weights(p, generator), stats or {}
    scores = {}
    for module in modules:
        features = criterion.feature_scores(units[module], stats.get(module)).double().cpu()
        if module == "mlp":
            scores[module] = features
            continue
        a = p.attention
        per_head = features.view(a.heads, a.head_dim).sum(1)
        if attention == "query":
            scores[module] = per_head
            continue
        kv = criterion.kv_scores(units[module])
        per_group = per_head.view(a.kv_heads, a.group_size).sum(1)
        scores[module] = per_group if kv is None else per_group + kv.double().cpu().view(a.kv_heads, a.head_dim).sum(1)
    return BlockScores(units, stats, scores)


def walk_blocks(model, parts, criterion: Criterion, modules, attention: str, generator, calibration: Tensor,
                batch_size: int, device: torch.device, decide, between_blocks) -> List[BlockScores]:
    """Each block on the device in turn: its readers' statistics on its inputs, its scores, and with
    `decide` (uniform allocation) its units chosen and masked; the next block's inputs are the masked
    block's outputs (criterion.sequential, where the criterion has it: Wanda's) or the dense block's."""
    sequential = sequential_of(criterion)
    _, blocks = decoder_blocks(model)
    move_outside_blocks(model, blocks, device)
    inputs = catch_inputs(model, blocks, calibration, batch_size, device)
    scored = []
    for index, p in enumerate(parts):
        p.block.to(device)
        stats = {m: criterion.unit_stat() for m in modules}
        readers = {"heads": p.attention.o, "mlp": p.mlp.reader}
        hooks = [(readers[m], lambda module, args, m=m: stats[m](args[0].reshape(-1, args[0].shape[-1])))
                 for m in modules]
        with hooked(hooks, pre=True):
            outputs = block_outputs(p.block, inputs)
        scored.append(score_block(p, criterion, modules, attention, generator, stats))
        if decide is not None:
            decide(index, scored[-1])
            if sequential:
                outputs = block_outputs(p.block, inputs)  # what the masked block gives the next one
        p.block.to("cpu")
        inputs = outputs
        between_blocks()
    move_outside_blocks(model, blocks, torch.device("cpu"))
    return scored


def uniform_keep(p: "structure.BlockParts", scored: BlockScores, counts: Dict[str, int], attention: str) -> Keep:
    keep = {}
    for module, removed in counts.items():
        scores = scored.scores[module]
        if module == "heads" and attention == "query":  # the `removed` lowest of every group
            a = p.attention
            order = scores.view(a.kv_heads, a.group_size).argsort(dim=1, stable=True)
            mask = torch.ones(a.kv_heads, a.group_size, dtype=torch.bool)
            mask.scatter_(1, order[:, :removed], False)
            keep[module] = mask.view(-1)
            continue
        mask = torch.ones(scores.numel(), dtype=torch.bool)
        mask[scores.argsort(stable=True)[:removed]] = False
        keep[module] = mask.repeat_interleave(p.attention.group_size) if module == "heads" else mask
    return keep


def standardised(scores: Tensor) -> Tensor:
    """(x − mean) / std over one block's units of one module (FLAP's standardisation), so blocks
    and modules of different scales compare; all zero where the units cannot be told apart."""
    if scores.numel() < 2 or float(scores.std()) == 0.0:
        return torch.zeros_like(scores)
    return (scores - scores.mean()) / scores.std()


def candidate_units(p: "structure.BlockParts", scores: Tensor, module: str, attention: str) -> Tensor:
    """The scores of the units a block can lose, in the order they may go: query-head slices
    (the r-th lowest head of every group, summed) are non-decreasing, so the lowest goes first."""
    if module == "heads" and attention == "query":
        a = p.attention
        return scores.view(a.kv_heads, a.group_size).sort(dim=1, stable=True).values.sum(0)
    return scores


def global_keep(parts, scored: List[BlockScores], costs: UnitCosts, sparsity: float, modules,
                attention: str) -> List[Keep]:
    """FLAP's adaptive structure: every block's units of every module ranked together on their
    standardised scores, the lowest removed first while the weights removed stay within half a
    unit of the target; each block keeps at least one unit of each module."""
    candidates = []
    for b, (p, s) in enumerate(zip(parts, scored)):
        for m in modules:
            z = standardised(candidate_units(p, s.scores[m], m, attention))
            candidates += [(float(v), b, m, u) for u, v in enumerate(z.tolist())]
    candidates.sort(key=lambda c: c[0])  # stable: a block's slices keep their order
    target = sparsity * len(parts) * sum(costs.params(m) for m in modules)
    alive = {(b, m): costs.units(m)[0] for b in range(len(parts)) for m in modules}
    gone: Dict[Tuple[int, str], List[int]] = {key: [] for key in alive}
    removed = 0
    for _, b, m, u in candidates:
        cost = costs.units(m)[1]
        if alive[(b, m)] == 1 or removed + cost > target + cost / 2:
            continue
        gone[(b, m)].append(u)
        alive[(b, m)] -= 1
        removed += cost
    return [{m: keep_of(p, s.scores[m], m, attention, gone[(b, m)]) for m in modules}
            for b, (p, s) in enumerate(zip(parts, scored))]


def keep_of(p: "structure.BlockParts", scores: Tensor, module: str, attention: str, gone: List[int]) -> Tensor:
    """Bool per query head (heads) or channel (mlp) from the units chosen to go."""
    if module == "heads" and attention == "query":  # slices 0..k-1: the k lowest heads of every group
        return uniform_keep(p, BlockScores({}, {}, {module: scores}), {module: len(gone)}, attention)[module]
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[gone] = False
    return keep.repeat_interleave(p.attention.group_size) if module == "heads" else keep


def mask_block(p: "structure.BlockParts", keep: Keep, scored: BlockScores, criterion: Criterion) -> None:
    """The masked block: what the removal will compute (the readers' columns of the units that go
    are zero), with the criterion's compensation in the readers' output biases."""
    for module, kept in keep.items():
        gone = ~kept.repeat_interleave(p.attention.head_dim) if module == "heads" else ~kept
        unit = scored.units[module]
        delta = criterion.output_bias(unit, scored.stats.get(module), gone)
        (structure.zero_heads if module == "heads" else structure.zero_channels)(p, kept)
        if delta is not None:
            structure.add_to_output_bias(unit.reader, delta)


def remove_checked(model: nn.Module, parts, keeps: List[Keep], calibration: Optional[Tensor],
                   device: torch.device) -> float:
    """Removes the masked units and checks, on one window, that the smaller model computes what
    the masked one did (as the compacted CNNs are checked). Returns the largest |Δ logit|."""
    ids = structure.check_window(model, calibration)
    before = structure.logits(model, ids, device)
    for p, keep in zip(parts, keeps):
        if "heads" in keep:
            structure.keep_heads(p, keep["heads"])
        if "mlp" in keep:
            structure.keep_channels(p, keep["mlp"])
    after = structure.logits(model, ids, device)
    difference = float((after - before).abs().max())
    tolerance = (1e-4 if after.dtype == torch.float32 else 3e-2) * max(1.0, float(before.abs().max()))
    if difference > tolerance:
        raise RuntimeError(f"the model with the pruned units removed computes something else than the masked "
                           f"model (largest |Δ logit| {difference:.3g}): a bug in lm/structure.py, please report it")
    return difference


def accumulate_gradients(model: nn.Module, windows: Tensor, batch_size: int, device: torch.device) -> None:
    """Each decoder-block parameter's .grad = ∂/∂w of the mean next-token loss over every
    calibration token (each batch's mean weighed by its share of the tokens), the whole model on
    the device (criterion.gradients=model)."""
    with outside_frozen(model):
        model.to(device).eval()
        model.zero_grad(set_to_none=True)
        try:
            for batch in windows.split(batch_size):
                ids = batch.to(device)
                (model(input_ids=ids, labels=ids, use_cache=False).loss * token_share(ids, windows)).backward()
        finally:
            model.to("cpu")


def gradients_block_by_block(model: nn.Module, windows: Tensor, batch_size: int, device: torch.device) -> None:
    """The same gradients with one decoder block on the device at a time (criterion.gradients=blocks):
    a pass without graphs keeps every block's inputs on the CPU; the loss's gradient at the last
    block's output comes from the parts after the blocks; then each block, from the last, runs
    again with its graph and back-propagates, handing the gradient at its input to the block before."""
    prefix, blocks = decoder_blocks(model)
    batches = list(windows.split(batch_size))
    with outside_frozen(model):
        model.eval()
        model.zero_grad(set_to_none=True)
        move_outside_blocks(model, blocks, device)
        stored, outputs = [], catch_inputs(model, blocks, windows, batch_size, device)
        for block in blocks:
            stored.append([(hidden.cpu(), kwargs) for hidden, kwargs in outputs])
            block.to(device)
            outputs = block_outputs(block, outputs)
            block.to("cpu")
        upstream = [gradient_at_the_last_block(model, prefix, blocks, hidden, ids.to(device), windows)
                    for (hidden, _), ids in zip(outputs, batches)]
        for block, inputs in zip(reversed(blocks), reversed(stored)):
            block.to(device)
            for b, (hidden, kwargs) in enumerate(inputs):
                x = hidden.to(device).requires_grad_(True)
                call_block(block, (x, kwargs)).backward(upstream[b])
                upstream[b] = x.grad
            block.to("cpu")
        move_outside_blocks(model, blocks, torch.device("cpu"))


class Emit(nn.Module):
    """Stands in for the decoder blocks: hands the parts after them (final norm, output head, loss)
    a given hidden state."""

    def __init__(self, hidden: Tensor, like: nn.Module):
        super().__init__()
        self.hidden = hidden
        if hasattr(like, "attention_type"):  # models that choose each block's mask by its type
            self.attention_type = like.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return self.hidden


def gradient_at_the_last_block(model: nn.Module, prefix: str, blocks: nn.ModuleList, hidden: Tensor, ids: Tensor,
                               windows: Tensor) -> Tensor:
    """∂(the batch's weighed loss)/∂(the last block's output)."""
    parent_name, _, name = prefix.rpartition(".")
    parent = model.get_submodule(parent_name)
    leaf = hidden.detach().requires_grad_(True)
    setattr(parent, name, nn.ModuleList([Emit(leaf, blocks[-1])]))
    try:
        (model(input_ids=ids, labels=ids, use_cache=False).loss * token_share(ids, windows)).backward()
    finally:
        setattr(parent, name, blocks)
    return leaf.grad


def token_share(ids: Tensor, windows: Tensor) -> float:
    """A batch's share of the predicted calibration tokens: its mean loss times this sums to the mean over all."""
    return ids.shape[0] * (ids.shape[1] - 1) / (windows.shape[0] * (windows.shape[1] - 1))


@contextmanager
def outside_frozen(model: nn.Module):
    """Embeddings and the output head without gradients (no memory for them) while inside."""
    _, blocks = decoder_blocks(model)
    inside = {id(p) for p in blocks.parameters()}
    frozen = [p for p in model.parameters() if id(p) not in inside and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def clear_gradients(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None
