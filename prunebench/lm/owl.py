"""OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): a language model's decoder blocks
pruned to different sparsities, those with more outlier weights kept denser.

As the authors' code (luuyin/OWL, lib/prune_all.py: prune_wanda_outlier, check_outlier_mean):
  1. one pass over the dense blocks on the calibration windows (each block's inputs are the dense
     block before's outputs); for block l, its prunable layers' Wanda scores |W_ij|·‖X_j‖₂ all
     together, and D_l = the share of them above m × their mean (one mean over the whole block);
  2. densities d_l = (D_l − min D) / (max D − min D) · 2·lam, shifted so their mean is 1 − S;
     block l's sparsity is 1 − d_l, for every one of its layers.
The authors take a plain mean over blocks (they are all the same size in their models); here it
is weighted by each block's prunable weights in scope, which is the same for equal blocks and
keeps the overall sparsity at S otherwise. Their spread is 2·lam (max − min), so a block may be
up to 2·lam from S (config.options.OwlConfig checks that every block stays in [0, 1)). The
authors' outlier scores use the Wanda metric whatever the criterion that prunes afterwards
(OWL-magnitude, OWL-SparseGPT too): so here.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..core.layerwise import SquaredNorms, feed
from ..criteria.wanda import wanda_scores
from .blockwise import block_layers, block_outputs, call_block, catch_inputs, move_outside_blocks
from .hub import decoder_blocks


def outlier_ratio(scores: List[Tensor], m: float) -> float:
    """The share of all `scores` (a block's layers together) above m × their one mean (summed layer
    by layer: no copy of the block's scores in one tensor)."""
    count = sum(s.numel() for s in scores)
    threshold = m * float(sum(s.sum(dtype=torch.float64) for s in scores)) / count
    return sum(int((s > threshold).sum()) for s in scores) / count


def block_sparsities(ratios: List[float], sizes: List[int], target: float, lam: float) -> List[float]:
    """Each block's sparsity from its outlier ratio: densities spread over 2·lam (the most outliers
    densest), their mean weighted by `sizes` (prunable weights per block) 1 − target."""
    d = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(sizes, dtype=torch.float64)
    spread = d.max() - d.min()
    extra = (d - d.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(d)  # density above the least
    extra = extra - (extra * w).sum() / w.sum()
    return (target - extra).tolist()  # target − 0.0 where lam = 0: uniform exactly


@torch.no_grad()
def block_outlier_ratio(block: nn.Module, modules: Dict[str, nn.Module], weights: Dict[str, Tensor],
                        inputs: List, m: float) -> float:
    """D of one block: its layers' (`modules`, weights by the same names) Wanda scores on `inputs`
    (an expert no token reaches: every input feature alike, as blockwise's rule)."""
    norms = {n: SquaredNorms() for n in modules}
    feed(block, modules, inputs, norms, call=call_block)
    return outlier_ratio([wanda_scores(weights[n], norms[n].value if norms[n].value is not None
                                       else torch.ones(weights[n].shape[1], device=weights[n].device))
                          for n in modules], m)


@torch.no_grad()
def outlier_ratios(model: nn.Module, names: List[str], windows: Tensor, batch_size: int, device: torch.device,
                   m: float) -> Dict[int, float]:
    """{block index: D_l} for the blocks holding some of `names`, from the dense model, one block
    on the device at a time (as blockwise.prune_block_by_block)."""
    prefix, blocks = decoder_blocks(model)
    params = dict(model.named_parameters())
    move_outside_blocks(model, blocks, device)
    inputs = catch_inputs(model, blocks, windows, batch_size, device)
    ratios = {}
    for i, block in enumerate(blocks):
        here = f"{prefix}.{i}."
        mine = [n for n in names if n.startswith(here)]
        block.to(device)
        if mine:  # (a mixture's fused expert weights: each expert's matrix a layer)
            layers, weights, _ = block_layers(block, here, mine, params, dict.fromkeys(mine, 0.0))
            ratios[i] = block_outlier_ratio(block, layers, weights, inputs, m)
        if i + 1 < len(blocks):
            inputs = block_outputs(block, inputs)
        block.to("cpu")
    move_outside_blocks(model, blocks, torch.device("cpu"))
    return ratios


def allocate(exp, fractions: Dict[str, float]) -> Tuple[Dict[str, float], Dict]:
    """The layers' sparsities with cfg.allocation (uniform: `fractions` as they are) and the
    figures for the round: {"owl": {block: {"outlier_ratio", "sparsity"}}}."""
    cfg = exp.cfg
    if cfg.allocation.name != "owl" or not fractions:
        return fractions, {}
    target, lam = next(iter(fractions.values())), cfg.allocation.lam
    if any(abs(f - target) > 1e-12 for f in fractions.values()) or not (2 * lam <= target and 2 * lam < 1 - target):
        raise ConfigError(f"allocation=owl needs one sparsity for every layer in scope, at least 2·lam="
                          f"{2 * lam:g} from 0 and 1 (got {sorted(set(fractions.values()))})")
    prefix, _ = decoder_blocks(exp.model)
    ratios = outlier_ratios(exp.model, list(fractions), exp.calibration, cfg.calibration.batch_size, exp.device,
                            cfg.allocation.m)
    block_of = {n: int(n[len(prefix) + 1:].split(".")[0]) for n in fractions}
    sizes = [sum(exp.masks[n].numel() for n in fractions if block_of[n] == b) for b in ratios]
    sparsities = dict(zip(ratios, block_sparsities(list(ratios.values()), sizes, target, lam)))
    figures = {str(b): {"outlier_ratio": ratios[b], "sparsity": sparsities[b]} for b in ratios}
    return {n: sparsities[block_of[n]] for n in fractions}, {"owl": figures}
