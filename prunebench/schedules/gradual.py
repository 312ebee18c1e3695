"""Pruning inside one training run (Zhu & Gupta 2017): train → at each pruning step t_k: score →
select to s_k (pruned stays pruned) → train on → ... → fine-tune at the final masks → record.

Each pruning step is a row of the record: the network right after it is pruned
(`test_acc_pruned`) and after the training up to the next one (`test_acc`; for the last, after
the whole run and its fine-tuning). A row waits in the checkpoint until its `test_acc` is known,
so a run stopped between two pruning steps resumes exactly."""

from __future__ import annotations

import copy
import time
from typing import Dict, List, Optional

from torch import nn

from ..config import Config, ConfigError, GradualConfig
from ..core.masks import Masks
from ..core.metrics import weight_stats
from .steps import compact_fields, compacted, prune_step, record_dense, sparse_fields, train_then_finetune
from ..runs.rows import accuracy, round_row
from ..runs.state import RunState
from . import Schedule, register
from ..training.hooks import MaskUpdates
from ..training.loop import steps_per_epoch


def pruning_times(schedule: GradualConfig, per_epoch: int) -> List[int]:
    """The optimizer steps after which each pruning step happens."""
    scale = per_epoch if schedule.unit == "epochs" else 1
    return [max(1, round(t * scale)) for t in schedule.times()]


def check_gradual(cfg: Config, criterion, data) -> None:
    """Before any training: the pruning steps fit in the run, and the criterion can prune inside it."""
    if criterion.reconstructs:
        raise ConfigError(f"criterion={cfg.criterion.name} reconstructs the weights layer by layer after training: "
                          f"use schedule=oneshot or iterative")
    if criterion.sets_own_sparsity or criterion.changes_architecture:
        raise ConfigError(f"criterion={cfg.criterion.name} cannot follow schedule=gradual's sparsity targets "
                          f"(it {'sets its own sparsity' if criterion.sets_own_sparsity else 'rewrites the network'})"
                          f"; use a criterion that scores weights (magnitude, snip, obd, ...)")
    per_epoch = steps_per_epoch(data, cfg.train.batch_size)
    total, times = cfg.train.pretrain_epochs * per_epoch, pruning_times(cfg.schedule, per_epoch)
    if len(set(times)) < len(times):
        raise ConfigError(f"schedule.every={cfg.schedule.every} {cfg.schedule.unit} is less than one optimizer step "
                          f"({per_epoch} steps per epoch): two pruning steps would fall on the same step")
    if times[-1] > total:
        raise ConfigError(f"schedule.end={cfg.schedule.end} steps is beyond the training ({total} steps in "
                          f"{cfg.train.pretrain_epochs} epochs: train.epochs, or train.pretrain_epochs when set); the "
                          f"last pruning step must come before training ends")


class GradualPruning(MaskUpdates):
    """fit's mask updates: prunes at each of its times, and records each pruning step's row."""

    def __init__(self, run: RunState, pending: Optional[Dict] = None):
        self.run = run
        self.times = pruning_times(run.cfg.schedule, steps_per_epoch(run.exp.data, run.cfg.train.batch_size))
        self.at = set(self.times)
        self.pending = pending  # the last pruning step's row, waiting for its test_acc
        self.started = time.perf_counter()

    def due(self, step: int) -> bool:
        return step in self.at

    def update(self, step: int, model: nn.Module, batch=None) -> Masks:
        run = self.run
        k = self.times.index(step) + 1
        if self.pending is None and not run.rec.rounds:
            record_dense(run, at_step=step)  # the network as it is before its first pruning step
            if run.exp.granularity.structured and run.cfg.latency.repeats:  # to time the compacted one against
                run.progress.dense_model = copy.deepcopy(model).eval()
        else:
            self.complete(run.test())
        t0 = time.perf_counter()
        pruned = prune_step(run.exp, run.score_context(k, len(self.times)), run.exp.targets[k - 1])
        run.progress.masks = pruned.masks
        after = run.test()
        per_epoch = steps_per_epoch(run.exp.data, run.cfg.train.batch_size)
        self.pending = {"round": k, "step": step, "epoch": step / per_epoch,
                        "test_acc_pruned": after.accuracy, "test_loss_pruned": after.loss,
                        "score_seconds": time.perf_counter() - t0, **pruned.compensation}
        self.started = time.perf_counter()
        return pruned.enforced

    def complete(self, result, extra: Optional[Dict] = None) -> None:
        """Record the pending row with the accuracy its masks reached."""
        run, row = self.run, dict(self.pending)
        stats = weight_stats(run.model, run.progress.masks, run.exp.macs)
        k = row.pop("round")
        pruned = {"test_acc": row.pop("test_acc_pruned"), "test_loss": row.pop("test_loss_pruned")}
        run.rec.record_round(round_row(k, run.exp.targets[k - 1], stats, pruned, {**accuracy(result), **run.val()},
                                       row.pop("score_seconds"), time.perf_counter() - self.started,
                                       run.exp.macs.total, **row, **(extra or {})), stats)
        self.pending = None

    def state(self, trained: bool = False) -> Dict:
        """What its checkpoints keep: the pending row, and whether the training run is over."""
        return {"pending": self.pending, "trained": trained}


def train_while_pruning(run: RunState, resumed: Optional[Dict]) -> Optional[nn.Module]:
    """The whole gradual run; returns the compacted network (structured pruning)."""
    progress, resumed = run.progress, resumed or {}
    pruning = GradualPruning(run, resumed.get("pending"))
    if progress.rounds_done < len(pruning.times):  # else: the checkpoint holds the finished run
        run.stage = "training (gradual pruning)"
        train_then_finetune(run, "gradual", pruning, resumed.get("trained", False), len(pruning.times))
        compact = compacted(run)
        pruning.complete(run.test(), compact_fields(run, compact) if compact is not None else sparse_fields(run))
        progress.rounds_done = len(pruning.times)
        run.checkpoints.save(f"round {progress.rounds_done}", progress)
        run.stop.check()
        return compact
    return compacted(run)


@register("gradual")
class Gradual(Schedule):
    multi_process = False

    def check(self, cfg, criterion, granularity, masks, data) -> None:
        check_gradual(cfg, criterion, data)

    def run(self, run: RunState, resumed: Optional[Dict]) -> Optional[nn.Module]:
        return train_while_pruning(run, resumed)
