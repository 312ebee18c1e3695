"""What the schedules share: one pruning step (reparameterise → score → select → compensate →
zero), training then fine-tuning under mask updates, the compacted network of structured
pruning, and the figures of a row (size, latency, emptied layers)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Dict, Optional

import torch
from torch import nn

from ..config import Config, finetune_recipe
from ..core import distributed, layerwise
from ..core.csr import sparse_latency
from ..core.device import exact_fp32, seeded
from ..core.granularity import Granularity
from ..core.masks import Masks, prunable_weights
from ..core.metrics import MacCount, count_macs, weight_stats
from ..core.select import Target
from ..core.structure import compare_latency, count_params
from ..criteria import ScoreContext
from ..runs.state import RunState
from ..training.loop import fit

if TYPE_CHECKING:
    from ..runs.experiment import Experiment

log = logging.getLogger("prunebench")


def record_dense(run: RunState, **extra) -> None:
    dense = run.test()
    stats = weight_stats(run.model, run.exp.masks, run.exp.macs)
    run.rec.record_dense({"test_acc": dense.accuracy, "test_loss": dense.loss}, stats, **run.val(), **extra)


def train_then_finetune(run: RunState, phase: str, updates, trained: bool, finetune_round: int) -> None:
    """For the schedules that prune inside training: train.epochs with `updates` changing the
    masks (skipped when the checkpoint says this training is over), then train.finetune_epochs at
    the final masks; the truly pruned weights are checked at the end."""
    cfg, exp, progress = run.cfg, run.exp, run.progress
    train = cfg.train
    if not trained:
        fit(run.model, exp.data, train, train.pretrain_epochs, train.lr, run.data_order,
            masks=with_coupled(progress.masks, exp.granularity, run.model),
            hooks=[updates, run.epoch_record(phase, 0, train.pretrain_epochs),
                   run.checkpoints.phase(phase, progress, updates.state)], resume=run.resume_fit())
        run.checkpoints.save("trained", progress, round_state=updates.state(trained=True))
        run.stop.check()
    run.stage = "fine-tuning"
    finetune = finetune_recipe(train)
    fit(run.model, exp.data, finetune, train.finetune_epochs, finetune.lr, run.data_order,
        masks=with_coupled(progress.masks, exp.granularity, run.model),
        hooks=[run.epoch_record("finetune", finetune_round, train.finetune_epochs),
               run.checkpoints.phase("finetune", progress, lambda: updates.state(trained=True))],
        resume=run.resume_fit())
    with_coupled(progress.masks, exp.granularity, run.model).bind(run.model).check_weights()  # truly pruned
    exp.granularity.verify(progress.masks, dict(run.model.named_parameters()), exp.targets[-1])


def compacted(run: RunState) -> Optional[nn.Module]:
    """Structured: the physically smaller network the masks leave, in the training's memory
    layout (None for unstructured masks)."""
    exp = run.exp
    if not exp.granularity.structured:
        return None
    compact = exp.granularity.structure.compact(run.model, run.progress.masks, exp.data.input_shape)
    return compact.to(memory_format=torch.channels_last) if run.cfg.train.channels_last else compact


def compact_fields(run: RunState, compact: nn.Module) -> Dict:
    """Structured: the compacted network's size, compute and latency against the dense one's."""
    cfg, exp = run.cfg, run.exp
    check_compact(compact, run.model, exp.data)
    out = {"units_removed": units_removed(exp.granularity, run.progress.masks),
           **compact_size(compact, exp.data.input_shape, cfg, run.rec.dense, exp.macs)}
    if run.progress.dense_model is not None:
        lat = cfg.latency
        out.update(compare_latency(run.progress.dense_model, compact, exp.data.input_shape, lat.batch_sizes,
                                   lat.repeats, lat.warmup, cfg.train.precision, cfg.train.channels_last))
    return out


def sparse_fields(run: RunState) -> Dict:
    """Unstructured: the final network's latency run dense and with sparse kernels where they pay."""
    lat = run.cfg.latency
    if not (lat.repeats and lat.sparse) or run.exp.granularity.structured:
        return {}
    return {"sparse_latency": sparse_latency(run.model, run.exp.data.input_shape, lat.batch_sizes, lat.repeats,
                                             lat.warmup)}


def fresh_model(exp: Experiment, seed: int, round: int) -> nn.Module:
    """A new initialisation for reinit policies: its own seed per round, the global RNG (CPU and
    GPUs) untouched."""
    with seeded(seed * 1_000_003 + round):
        return exp.new_model()


@dataclass
class PruneStep:
    model: nn.Module  # the network pruned (another one when the criterion reparameterises)
    masks: Masks  # over the prunable weights
    enforced: Masks  # those and, for structured pruning, the removed units' biases and norm entries
    compensation: Dict  # what an OBS-type update reports
    macs: Optional[MacCount] = None  # the new network's dense MACs, when it changed


def prune_step(exp: Experiment, ctx: ScoreContext, target: Optional[Target]) -> PruneStep:
    """One round's pruning: (reparameterise) → score → select → compensate → zero."""
    model, macs = ctx.model, None
    # EigenDamage prunes in the Kronecker eigenbasis: the same function, another network
    reparameterized = exp.criterion.reparameterize(ctx, target)
    if reparameterized is not None:
        model = reparameterized
        cfg = exp.cfg.model
        ctx = replace(ctx, model=model, masks=Masks.ones(model, biases=cfg.prune_biases, norm=cfg.prune_norm))
        exp.granularity.bind(model, exp.data.input_shape)
        macs = count_macs(model, exp.data.input_shape)
    dense = layerwise.measurable_weights(model, ctx.masks) if exp.cfg.calibration.layer_errors else None
    masks = exp.criterion.prune(ctx, target, exp.granularity)
    # every rank scored the same batches, but GPU kernels may differ in the last bits between
    # ranks and flip a weight at the threshold: rank 0 decides
    distributed.broadcast_from_main(m for _, m in masks.items())
    # OBS-type criteria move the surviving weights, from the unpruned ones, before masking
    compensation = exp.criterion.compensate(model, masks, ctx) or {}
    # structured: the removed units' biases and norm entries go too, so each outputs 0
    enforced = with_coupled(masks, exp.granularity, model)
    enforced.apply(model)
    distributed.broadcast_from_main(model.state_dict().values())  # and so do rank 0's compensated weights
    if dense is not None:  # how far each layer's outputs moved, on the calibration inputs
        compensation["layer_errors"] = layerwise.reconstruction_errors(model, dense, ctx.calibration())
    return PruneStep(model, masks, enforced, compensation, macs)


def with_coupled(masks: Masks, granularity: Granularity, model: nn.Module) -> Masks:
    """The masks to enforce: the prunable weights', plus (structured) the removed units' biases
    and norm scale/shift."""
    if not granularity.structured:
        return masks
    return Masks({**dict(masks.items()), **dict(granularity.structure.coupled(masks, model).items())})


def units_removed(granularity: Granularity, masks: Masks) -> float:
    """Fraction of the units (filters, or EigenDamage's directions and channels) that are gone."""
    owners = granularity.owners(masks)
    total = sum(granularity.group_count(n, masks) for n in owners)
    return 1.0 - sum(int(granularity.alive(n, masks).sum()) for n in owners) / total


def compact_size(compact: nn.Module, input_shape, cfg: Config, dense: Dict, dense_macs: MacCount) -> Dict:
    """Size and compute of the compacted network, against the dense one.


    For structured pruning the round's size figures are those of the compacted network:
    sparsity = 1 - its prunable weights / the dense network's, compression = dense parameters /
    its parameters. For filter/channel pruning they equal the masked network's zero counts; for
    EigenDamage, whose network has another shape, they are the only honest ones."""
    macs = count_macs(compact, input_shape)
    prunable = sum(p.numel() for p in prunable_weights(compact, biases=cfg.model.prune_biases,
                                                        norm=cfg.model.prune_norm).values())
    params = count_params(compact)
    out = {
        "sparsity": 1.0 - prunable / dense["prunable_total"],
        "compression": dense["params_total"] / params,
        "params_remaining": params, "prunable_remaining": prunable,
        "flops_remaining": macs.total, "flops_reduction": dense_macs.total / max(1, macs.total),
        "channels": {n: int(m.weight.shape[0]) for n, m in compact.named_modules()
                     if isinstance(m, (nn.Conv2d, nn.Linear))},
    }
    return out


@torch.no_grad()
def check_compact(compact: nn.Module, model: nn.Module, data) -> None:
    """The compacted network must compute what the masked one does: a wrong graph would otherwise
    pass silently into every latency figure. On a seeded batch of the data's shape (the same
    function on any input; no split read for it, so over several ranks none reads more than its
    share). In full fp32: with TF32, cuDNN may pick other algorithms for other channel counts,
    which differ by ~1e-3 relative."""
    weight = next(model.parameters())
    x = torch.randn((64, *data.input_shape), generator=torch.Generator().manual_seed(0)).to(weight)
    modes = model.training, compact.training
    model.eval()
    compact.eval()
    with exact_fp32():
        ref, out = model(x), compact(x)
    model.train(modes[0])
    compact.train(modes[1])
    if not torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-5):
        raise RuntimeError(f"the compacted network's outputs differ from the masked network's "
                           f"(max abs difference {float((out - ref).abs().max()):.3g})")
