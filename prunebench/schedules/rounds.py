"""schedule=oneshot|iterative — pruning between training phases: pretrain → for each round:
score → select → (compensate) → retrain policy → finetune → record (Han, Li, LTH, OBD/OBS,
SNIP/GraSP/SynFlow with one round).

Each phase starts by asking whether the run's progress already holds its result (a resumed run),
as OpenLTH's runner does."""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from typing import Dict, Optional

from torch import nn

from ..config import finetune_recipe
from ..core import distributed
from ..core.masks import Masks
from ..core.metrics import weight_stats
from ..core.select import Target
from ..core.structure import expand_into
from ..retrain import apply_policy, snapshot
from ..runs.rows import accuracy, round_row
from ..runs.state import RunState
from ..training.evaluate import EvalResult
from ..training.hooks import Hook
from ..training.loop import fit
from . import Schedule, register
from .steps import compact_fields, compacted, fresh_model, prune_step, record_dense, sparse_fields, with_coupled

log = logging.getLogger("prunebench")


# ------------------------------------------------------------------------------- pretrain
def pretrain(run: RunState) -> None:
    """θ0 → θ*, keeping the rewind point; records the dense network."""
    cfg, exp, progress = run.cfg, run.exp, run.progress
    if progress.rounds_done >= 0:  # already in the checkpoint
        return
    train = cfg.train
    fit(run.model, exp.data, train, train.pretrain_epochs, train.lr, run.data_order,
        hooks=[KeepRewindPoint(cfg.retrain.keeps_epoch(), progress),
               run.epoch_record("pretrain", 0, train.pretrain_epochs), run.checkpoints.phase("pretrain", progress)],
        resume=run.resume_fit())
    distributed.check_same("trained weights", run.model.state_dict())
    record_dense(run)
    # structured: the dense network, to time against each round's compacted one
    if exp.granularity.structured and cfg.latency.repeats:
        progress.dense_model = copy.deepcopy(run.model).eval()
    progress.rounds_done = 0
    run.checkpoints.save("pretrained", progress)
    run.stop.check()


class KeepRewindPoint(Hook):
    """Keeps the weights after the retrain policy's epoch: the rewind point (Frankle et al. 2020)."""

    def __init__(self, epoch: Optional[int], progress):
        self.epoch, self.progress = epoch, progress

    def epoch_end(self, loop, result) -> None:
        if result.epoch == self.epoch:
            self.progress.rewind_state = snapshot(loop.model)


# ------------------------------------------------------------------------------- rounds
@dataclass
class RoundStart:
    """What a round computed before fine-tuning: kept in its checkpoints, so a round resumed while
    fine-tuning goes on from here without pruning again."""

    pruned: EvalResult  # after pruning, before retraining
    score_seconds: float
    diagnostics: Optional[Dict]  # the retrain policy's
    compensation: Dict  # an OBS-type update's
    compact: Optional[nn.Module]  # structured: the physically smaller network that is fine-tuned
    started: float  # perf_counter when its retraining began

    def state(self) -> Dict:
        p = self.pruned
        return {"pruned": [p.accuracy, p.loss, p.correct, p.total], "score_seconds": self.score_seconds,
                # plain JSON values: a checkpoint loads nothing else (weights_only)
                "diagnostics": json.loads(json.dumps(self.diagnostics)),
                "compensation": json.loads(json.dumps(self.compensation)),
                "train_seconds": time.perf_counter() - self.started,
                "compact": self.compact.state_dict() if self.compact is not None else None}

    @classmethod
    def from_state(cls, state: Dict, run: RunState) -> "RoundStart":
        compact = None
        if state["compact"] is not None:  # rebuilt from the masks, then its fine-tuned weights
            compact = compacted(run)
            compact.load_state_dict(state["compact"])
        return cls(EvalResult(*state["pruned"]), state["score_seconds"], state["diagnostics"],
                   state["compensation"], compact, time.perf_counter() - state["train_seconds"])


def prune_rounds(run: RunState, resumed: Optional[Dict]) -> Optional[nn.Module]:
    """Every round not yet done; returns the last compacted network (structured pruning)."""
    exp, progress = run.exp, run.progress
    compact = None
    for r, target in enumerate(exp.targets, 1):
        if r <= progress.rounds_done:
            continue
        run.stage = f"round {r}"
        start = RoundStart.from_state(resumed, run) if resumed is not None else start_round(run, r, target)
        resume_finetune = run.resume_fit() if resumed is not None else None
        resumed = None
        compact = finetune_round(run, r, start, resume_finetune)
        record_round(run, r, target, start, compact)
        progress.rounds_done = r
        if not exp.criterion.changes_architecture:  # EigenDamage's rewritten net: its round is redone
            run.checkpoints.save(f"round {r}", progress)
        run.stop.check()
    return compact if compact is not None else compacted(run)  # resumed after the last round: compact again


def start_round(run: RunState, r: int, target: Optional[Target]) -> RoundStart:
    """Score, select, mask, then the retrain policy; structured: compact."""
    cfg, exp, progress = run.cfg, run.exp, run.progress
    t0 = time.perf_counter()
    step = prune_step(exp, run.score_context(r, len(exp.targets)), target)
    progress.model, progress.masks = step.model, step.masks
    if step.macs is not None:
        progress.macs = step.macs
    score_seconds = time.perf_counter() - t0
    pruned = run.test()
    started = time.perf_counter()
    diagnostics = apply_policy(cfg.retrain, step.model, step.masks, init_state=progress.init_state,
                               rewind_state=progress.rewind_state,
                               fresh_model=lambda: fresh_model(exp, cfg.seed, r))
    compact = None
    if exp.granularity.structured:  # fine-tune the physically smaller network
        step.enforced.apply(step.model)
        compact = compacted(run)
    return RoundStart(pruned, score_seconds, diagnostics, step.compensation, compact, started)


def finetune_round(run: RunState, r: int, start: RoundStart, resume) -> Optional[nn.Module]:
    cfg, exp, progress = run.cfg, run.exp, run.progress
    train, finetune = cfg.train, finetune_recipe(cfg.train)
    phase = run.checkpoints.phase(f"round {r} finetune", progress, start.state,
                                  savable=not exp.criterion.changes_architecture)
    trainee = CompactNetwork(run, start.compact) if start.compact is not None else MaskedNetwork(run)
    fit(trainee.net, exp.data, finetune, train.finetune_epochs, finetune.lr, run.data_order, masks=trainee.masks,
        hooks=[run.epoch_record("finetune", r, train.finetune_epochs, trainee.net), phase], resume=resume)
    trainee.write_back()
    distributed.check_same("fine-tuned weights", run.model.state_dict())
    return start.compact


class MaskedNetwork:
    """What a phase trains: the whole network, its pruned weights (and, structured, the removed
    units' biases and norm entries) held at zero."""

    def __init__(self, run: RunState):
        self.net = run.model
        self.masks: Optional[Masks] = with_coupled(run.progress.masks, run.exp.granularity, run.model)

    def write_back(self) -> None:
        """Nothing to do: the network trained is the run's."""


class CompactNetwork:
    """What a phase trains after structured pruning: the physically smaller network (nothing to
    mask), whose weights are then written back into the run's masked one."""

    def __init__(self, run: RunState, compact: nn.Module):
        self.run, self.net, self.masks = run, compact, None

    def write_back(self) -> None:
        run = self.run
        expand_into(run.exp.granularity.structure, run.model, self.net, run.progress.masks)


def record_round(run: RunState, r: int, target: Optional[Target], start: RoundStart,
                 compact: Optional[nn.Module]) -> None:
    cfg, exp, progress = run.cfg, run.exp, run.progress
    train_seconds = time.perf_counter() - start.started
    final = run.test()
    masks = progress.masks
    with_coupled(masks, exp.granularity, run.model).bind(run.model).check_weights()  # truly pruned
    exp.granularity.verify(masks, dict(run.model.named_parameters()), target)  # N:M: still the pattern
    stats = weight_stats(run.model, masks, progress.macs or exp.macs)
    row = round_row(r, target, stats, accuracy(start.pruned), {**accuracy(final), **run.val()}, start.score_seconds,
                    train_seconds, exp.macs.total, **start.compensation,
                    **({cfg.retrain.name: start.diagnostics} if start.diagnostics else {}))
    if compact is not None:
        row.update(compact_fields(run, compact))
    elif r == len(run.exp.targets):
        row.update(sparse_fields(run))
    run.rec.record_round(row, stats)


@register("oneshot", "iterative")
class Rounds(Schedule):
    def run(self, run: RunState, resumed: Optional[Dict]) -> Optional[nn.Module]:
        pretrain(run)
        return prune_rounds(run, resumed)
