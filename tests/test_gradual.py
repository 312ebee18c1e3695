"""Gradual pruning inside training (Zhu & Gupta 2017): the cubic schedule, its pruning steps, the
masks it trains on, resuming between two pruning steps, and what it refuses."""

import csv
import signal
from collections import defaultdict

import pytest
import torch
from conftest import make_config, read_summary
from test_resume import StopAfter, checkpoint_of, without_wall_clock
from torch import nn

from prunebench.runs import checkpoint
from prunebench.config import ConfigError, TrainConfig
from prunebench.data import TensorData
from prunebench.core.masks import Masks
from prunebench.pipeline import build, run
from prunebench.training.hooks import MaskUpdates
from prunebench.training.loop import fit

# 256 examples / batch 32 = 8 steps per epoch; 4 epochs of training; prune at epochs 1.5, 2, 2.5, 3
GRADUAL = ["schedule=gradual", "dataset.num_train=256", "dataset.num_test=128", "train.batch_size=32",
           "train.pretrain_epochs=4", "train.finetune_epochs=1", "schedule.start=1", "schedule.end=3",
           "schedule.every=0.5", "sparsity=0.8"]


def test_the_cubic_schedule_by_hand():
    cfg = make_config(*GRADUAL)
    # s_k = 0.8 (1 - (1 - k/4)^3)
    assert cfg.schedule.targets(0.8) == pytest.approx([0.4625, 0.7, 0.7875, 0.8])
    assert cfg.schedule.targets(0.8)[-1] == 0.8
    with_initial = make_config(*GRADUAL, "schedule.initial_sparsity=0.2").schedule
    assert with_initial.targets(0.8) == pytest.approx([0.2, 0.5469, 0.7250, 0.7906, 0.8], abs=1e-4)
    assert with_initial.times() == [1, 1.5, 2, 2.5, 3]


def test_a_gradual_run_prunes_at_its_steps_to_its_targets_and_never_revives(tmp_path):
    summary = run(make_config(*GRADUAL), tmp_path)
    rows = summary["rounds"]
    assert [r["step"] for r in rows] == [12, 16, 20, 24]
    assert [r["sparsity"] for r in rows] == pytest.approx([0.4625, 0.7, 0.7875, 0.8], abs=1 / summary["prunable_total"])
    assert summary["dense_at_step"] == 12 and summary["final"]["sparsity"] == pytest.approx(0.8, abs=1e-5)
    nonzero = defaultdict(list)
    for row in csv.DictReader(open(tmp_path / "layers.csv")):
        nonzero[row["layer"]].append(int(row["nonzero"]))
    assert all(counts == sorted(counts, reverse=True) for counts in nonzero.values())  # pruned stays pruned
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    masks = Masks.load(tmp_path / "masks.pt")
    assert all(bool((state[n][m == 0] == 0).all()) for n, m in masks.items())


def test_filter_granularity_prunes_whole_units_gradually_and_compacts(tmp_path):
    summary = run(make_config(*GRADUAL, "model=lenet5", "granularity=filter", "criterion.scope=layer",
                              "sparsity=0.5", "latency.repeats=1", "latency.batch_sizes=[2]"), tmp_path)
    assert summary["final"]["units_removed"] == pytest.approx(0.5, abs=0.02)
    assert summary["final"]["speedup_b2"] > 0 and (tmp_path / "model_compact.pt2").exists()


@pytest.mark.parametrize("phase, round, epoch", [("gradual", 0, 2), ("finetune", 4, 1)])
def test_a_run_stopped_between_two_pruning_steps_resumes_exactly(phase, round, epoch, monkeypatch, tmp_path):
    cfg = make_config(*GRADUAL, "train.finetune_epochs=2", "train.optimizer=sgd", "train.momentum=0.9")
    reference = run(cfg, tmp_path / "reference")
    with monkeypatch.context() as m:
        StopAfter(m, signal.SIGUSR1, phase, round, epoch)
        with pytest.raises(checkpoint.Interrupted):
            run(cfg, tmp_path / "stopped")
    saved = checkpoint_of(tmp_path / "stopped")
    assert saved["round"]["pending"] is not None
    resumed = run(cfg, tmp_path / "stopped")
    assert without_wall_clock(resumed) == without_wall_clock(reference)
    assert without_wall_clock(read_summary(tmp_path / "stopped")) == without_wall_clock(reference)


class PruneAt(MaskUpdates):
    """Prunes the first layer's first half at one step."""

    def __init__(self, model, step):
        self.step, self.masks = step, Masks.ones(model)
        self.masks["0.weight"][:, :2] = 0

    def due(self, step):
        return step == self.step

    def update(self, step, model, batch):
        return self.masks


def test_weights_pruned_mid_training_stay_zero_under_momentum_and_weight_decay():
    """Momentum and Adam's moments of newly pruned weights are zeroed with them; else the next
    steps would move them again (fit checks after every epoch and would raise)."""
    g = torch.Generator().manual_seed(0)
    data = TensorData("t", torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g),
                      torch.randn(8, 4), torch.randint(0, 3, (8,)), 3)
    for optimizer in ("sgd", "adam"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
        cfg = TrainConfig(optimizer=optimizer, lr=0.1, momentum=0.9 if optimizer == "sgd" else 0.0,
                          weight_decay=1e-3, batch_size=8)
        fit(model, data, cfg, 2, cfg.lr, torch.Generator().manual_seed(1), hooks=[PruneAt(model, 3)])
        assert bool((model[0].weight[:, :2] == 0).all()) and bool((model[0].weight[:, 2:] != 0).all())


@pytest.mark.parametrize("options, message", [
    (["criterion=magnitude_std"], "criterion=magnitude_std cannot follow schedule=gradual"),
    (["model=lenet5", "granularity=filter", "criterion=eigendamage"],
     "eigendamage prunes a reparameterised network once"),
    (["schedule.unit=steps", "schedule.start=10", "schedule.end=40", "schedule.every=10"],
     "schedule.end=40.0 steps is beyond the training \\(32 steps"),
    (["schedule.every=0.1"], "schedule.every=0.1 epochs is less than one optimizer step \\(8 steps per epoch"),
])
def test_what_gradual_pruning_refuses_before_training(options, message):
    with pytest.raises(ConfigError, match=message):
        build(make_config(*GRADUAL, *options))
