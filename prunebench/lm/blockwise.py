"""Calibration and pruning one decoder block at a time, as SparseGPT's and Wanda's scripts do.

Only the embeddings (and what else lies outside the decoder blocks) and one block at a time are
on the device; the other blocks wait on the CPU. The calibration windows are run up to the first
block, whose inputs (hidden states, and the keyword arguments the model passes every block:
attention mask, positions, rotary tables) are caught there. Then for each block in turn: onto
the device, its Linear layers pruned from their inputs (layerwise.layer_by_layer inside the
block, so criterion.sequential_unit=layer|block and criterion.sequential mean what they mean for
any network), its outputs on the calibration windows computed (by the pruned block when
sequential, else by the dense one) as the next block's inputs, back to the CPU.

A mixture of experts' fused expert weights are pruned expert by expert: each expert's matrix is a
layer calibrated on the tokens the router sends to that expert (lm/moe.ExpertTap). An expert that
no calibration token reaches is calibrated on the identity (every input feature once, alone):
all its features count alike, so Wanda's scores are its |W| and SparseGPT's Hessian is a multiple
of I (its saliency |W|², no update): the layer's magnitude pruning, in the criterion's own
pattern. Those experts are recorded (BlockRecord.uncalibrated).

Peak device memory: the parts outside the blocks, one block, the hidden states in and out
(2 · samples · seq_len · width values in the model's dtype) and the layer statistics of one group
(SparseGPT: a float32 Hessian per layer, columns², all of a block's layers with sequential_unit=block).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..core.granularity import Granularity
from ..core.layerwise import Reached, layer_by_layer
from . import moe
from .hub import decoder_blocks

BlockInput = Tuple[Tensor, Dict[str, Any]]  # hidden states, and the keyword arguments of the block call


@dataclass
class BlockRecord:
    seconds: List[float] = field(default_factory=list)  # per block
    peak_device_bytes: Optional[int] = None  # on a GPU: the most allocated at once while pruning
    resumed: int = 0  # blocks pruned before a resume (their seconds are the first ones)
    uncalibrated: List[str] = field(default_factory=list)  # expert layers no calibration token reached


class BlockProgress:
    """Where block-by-block pruning starts and what it keeps after each block. This one starts
    at the first block and keeps nothing; lm/resume.py's writes a checkpoint after every block
    and resumes from it."""

    def start(self, model: nn.Module, device: torch.device
              ) -> Tuple[int, Optional[List[BlockInput]], List[float], List[str]]:
        """The first block to prune, its inputs (None: catch them from the calibration windows),
        the seconds the blocks before it took and the expert layers no calibration token reached there."""
        return 0, None, [], []

    def block_done(self, index: int, blocks: int, weights: Dict[str, Tensor], next_inputs: Optional[List[BlockInput]],
                   seconds: float, uncalibrated: List[str]) -> None:
        """Block `index` (of `blocks`) is pruned: its prunable weights (on the CPU), the inputs of
        the next block (None after the last), and the uncalibrated expert layers up to it."""


def move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Every parameter and buffer that is not in a decoder block onto `device`."""
    inside = {id(t) for t in blocks.parameters()} | {id(t) for t in blocks.buffers()}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in inside:
                p.data = p.data.to(device)
        for name, b in module.named_buffers(recurse=False):
            if id(b) not in inside:
                module._buffers[name] = b.to(device)


@torch.no_grad()
def catch_inputs(model: nn.Module, blocks: nn.ModuleList, windows: Tensor, batch_size: int,
                 device: torch.device) -> List[BlockInput]:
    """The first block's inputs for each batch of calibration windows. Windows of one length
    without padding give every batch of one size the same keyword arguments: those are kept once."""
    caught: List[BlockInput] = []
    shared: Dict[Tuple[int, ...], Dict[str, Any]] = {}

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden, shared.setdefault(tuple(hidden.shape), kwargs)))
        raise Reached

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in windows.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except Reached:
                pass
    finally:
        handle.remove()
    return caught


def call_block(block: nn.Module, item: BlockInput) -> Tensor:
    hidden, kwargs = item
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def block_outputs(block: nn.Module, inputs: List[BlockInput]) -> List[BlockInput]:
    return [(call_block(block, item), item[1]) for item in inputs]


def prune_block_by_block(model: nn.Module, fractions: Dict[str, float], criterion, granularity: Granularity,
                         windows: Tensor, batch_size: int, device: torch.device,
                         between_blocks: Callable[[], None] = lambda: None,
                         progress: Optional[BlockProgress] = None) -> BlockRecord:
    """Prunes the model's decoder-block layers named in `fractions` with a layer-wise criterion
    (its layer_stat / prune_layer), in place: afterwards the weights' zeros are the masks (a weight
    already zero counts as pruned), so no mask the size of the model is ever held. `progress`
    says where to start (a resumed run) and keeps each finished block. Returns what it cost."""
    prefix, blocks = decoder_blocks(model)
    params = dict(model.named_parameters())
    progress = progress or BlockProgress()
    record = BlockRecord()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    move_outside_blocks(model, blocks, device)
    record.resumed, inputs, record.seconds, record.uncalibrated = progress.start(model, device)
    first = record.resumed
    if first < len(blocks) and inputs is None:
        inputs = catch_inputs(model, blocks, windows, batch_size, device)
    for i in range(first, len(blocks)):
        started = time.perf_counter()
        names = [n for n in fractions if n.startswith(f"{prefix}.{i}.")]
        inputs = prune_block(blocks[i], f"{prefix}.{i}.", names, params, fractions, criterion, granularity, inputs,
                             device, record.uncalibrated)
        record.seconds.append(time.perf_counter() - started)
        progress.block_done(i, len(blocks), {n: params[n].detach() for n in names},
                            inputs if i + 1 < len(blocks) else None, record.seconds[-1], record.uncalibrated)
        between_blocks()
    move_outside_blocks(model, blocks, torch.device("cpu"))
    if device.type == "cuda":
        record.peak_device_bytes = torch.cuda.max_memory_allocated(device)
    return record


def prune_block(block: nn.Module, here: str, names: List[str], params: Dict[str, nn.Parameter],
                fractions: Dict[str, float], criterion, granularity: Granularity, inputs: List[BlockInput],
                device: torch.device, uncalibrated: Optional[List[str]] = None) -> List[BlockInput]:
    """One block on the device: its layers `names` pruned from `inputs` (a fused expert parameter:
    each expert's matrix as a layer); returns the next block's inputs (the pruned block's outputs
    when sequential, else the dense block's)."""
    block.to(device)
    layers, weights, fraction_of = block_layers(block, here, names, params, fractions)
    stats: Dict[str, object] = {}
    tokens: Dict[str, int] = {}

    def new_stat(name: str):
        stats[name], tokens[name] = criterion.layer_stat(name), 0

        def take(rows: Tensor) -> None:
            tokens[name] += rows.shape[0]
            stats[name](rows)

        return take

    def prune(name: str, _) -> None:
        weight, stat = weights[name], stats[name]
        if tokens[name] == 0 and isinstance(layers[name], moe.ExpertTap):  # the rule in the module's docstring
            stat(torch.eye(weight.shape[1], device=weight.device, dtype=weight.dtype))
            if uncalibrated is not None:
                uncalibrated.append(name)
        criterion.prune_layer(weight, stat, (weight != 0).to(weight.dtype), fraction_of[name], granularity)

    dense_outputs = None if criterion.cfg.sequential else block_outputs(block, inputs)
    if layers:
        layer_by_layer(block, layers, inputs, criterion.cfg.sequential, new_stat, prune,
                       criterion.cfg.sequential_unit, call=call_block)
    outputs = dense_outputs or block_outputs(block, inputs)
    block.to("cpu")
    return outputs


def block_layers(block: nn.Module, here: str, names: List[str], params: Dict[str, nn.Parameter],
                 fractions: Dict[str, float]):
    """The block's layers by name (a Linear, or an expert's matrix as a Tap), their weights (views
    of the parameters, on the device the block is on) and their target fractions."""
    stacks = {s.prefix: s for s in moe.expert_stacks_of_block(block, here)}
    layers: Dict[str, object] = {}
    weights: Dict[str, Tensor] = {}
    fraction_of: Dict[str, float] = {}
    for name in names:
        stack = next((s for s in stacks.values() if name in s.matrix_names()), None)
        if stack is None:
            layers[name] = block.get_submodule(name[len(here):].rpartition(".")[0])
            weights[name], fraction_of[name] = params[name].data, fractions[name]
            continue
        for layer, tap in moe.expert_layers(stack, only=name).items():
            layers[layer], fraction_of[layer] = tap, fractions[name]
            weights[layer] = stack.matrix(tap.param, tap.expert, tap.part)
    return layers, weights, fraction_of
