"""What the phases of one run share: the built experiment, its records, its progress (what a
checkpoint saves and a resumed run starts from) and its random streams."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional

import torch
from torch import nn

from .checkpoint import RunProgress, RunCheckpoints, StopSignals
from ..config import Config
from ..criteria import ScoreContext
from .record import Recorder
from ..training.evaluate import EvalResult, evaluate
from ..training.hooks import Hook
from ..training.loop import FitState

if TYPE_CHECKING:
    from .experiment import Experiment


@dataclass
class RunState:
    cfg: Config
    exp: "Experiment"
    rec: Recorder
    progress: RunProgress
    checkpoints: RunCheckpoints
    stop: StopSignals
    # separate streams, so changing one choice (say, the criterion) leaves the others' draws alone
    data_order: torch.Generator
    score_rng: torch.Generator
    saved: Optional[Dict] = None  # the checkpoint this run resumes from
    stage: str = "pretraining"  # where the run is, for a divergence report

    @property
    def model(self) -> nn.Module:
        return self.progress.model

    def resume_fit(self) -> Optional[FitState]:
        """The training phase the checkpoint stopped in (once: later phases start fresh)."""
        if not self.saved or self.saved["fit"] is None:
            return None
        state, self.saved["fit"] = self.saved["fit"], None
        return FitState(**state)

    # ------------------------------------------------------------------------ evaluation
    def test(self, net: Optional[nn.Module] = None) -> EvalResult:
        train = self.cfg.train
        return evaluate(net or self.model, self.exp.data.eval_batches("test", train.eval_batch_size),
                        train.precision, train.channels_last)

    def val(self, net: Optional[nn.Module] = None) -> Dict[str, float]:
        """Validation metrics (those a researcher may tune on), empty without a split."""
        if self.exp.data.num_examples("val") == 0:
            return {}
        train = self.cfg.train
        v = evaluate(net or self.model, self.exp.data.eval_batches("val", train.eval_batch_size), train.precision,
                     train.channels_last)
        return {"val_acc": v.accuracy, "val_loss": v.loss}

    def epoch_record(self, phase: str, round: int, epochs: int, net: Optional[nn.Module] = None) -> "EpochRecord":
        return EpochRecord(self, phase, round, epochs, net)

    def score_context(self, round: int, rounds: int) -> ScoreContext:
        exp, train = self.exp, self.cfg.train
        return ScoreContext(self.model, self.progress.masks, round=round, rounds=rounds,
                            init_state=self.progress.init_state,
                            batches=lambda: exp.data.train_batches(train.batch_size, self.score_rng),
                            generator=self.score_rng, input_shape=exp.data.input_shape,
                            num_classes=exp.data.num_classes, memory=exp.memory, calibration=self.calibration_inputs)

    def calibration_inputs(self) -> List[torch.Tensor]:
        """calibration.samples inputs of calibration.source: the same draw whenever asked (its own seed)."""
        cal = self.cfg.calibration
        return list(self.exp.data.sample_inputs(cal.source, cal.samples, cal.batch_size, calibration_draw(self.cfg)))


def calibration_draw(cfg: Config) -> torch.Generator:
    """The generator of the calibration sample: calibration.seed (or the run's), apart from every other stream."""
    seed = cfg.seed if cfg.calibration.seed is None else cfg.calibration.seed
    return torch.Generator().manual_seed(seed * 1_000_003 + 17)


class EpochRecord(Hook):
    """The epoch's record of a training phase (with test/val metrics when train.eval_every_epoch)."""

    def __init__(self, run: RunState, phase: str, round: int, epochs: int, net: Optional[nn.Module]):
        self.run, self.phase, self.round, self.epochs, self.net = run, phase, round, epochs, net

    def epoch_end(self, loop, res) -> None:
        run = self.run
        every = run.cfg.train.eval_every_epoch
        t = run.test(self.net) if every else None
        run.rec.epoch(self.phase, self.round, res.epoch, self.epochs, res.train_loss, res.lr, res.seconds,
                      t.accuracy if t else None, t.loss if t else None, **(run.val(self.net) if every else {}))
