"""Sparse training from the start (SET, RigL): the layer budgets, the drop/grow rule, the state
of regrown weights, whole runs, resuming between two updates, and what it refuses."""

import json
import signal

import pytest
import torch
from conftest import make_config, read_summary
from test_resume import StopAfter, without_wall_clock
from torch import nn

from prunebench.runs import checkpoint
from prunebench.config import ConfigError
from prunebench.core.allocation import layer_densities
from prunebench.schedules.dynamic import dense_gradients, drop_and_grow
from prunebench.core.masks import Masks
from prunebench.pipeline import build, run
from prunebench.training.loop import restart_changed

# 256 examples / batch 32 = 8 steps per epoch, 3 epochs; updates every 4 steps until step 18
DYNAMIC = ["schedule=dynamic", "dataset.num_train=256", "dataset.num_test=128", "train.batch_size=32",
           "train.pretrain_epochs=3", "train.finetune_epochs=1", "schedule.every=4", "sparsity=0.8"]


def test_erk_budget_by_hand():
    """Σ dims / Π dims: 10/24 and 30/200; scale 112/40 = 2.8 makes the first denser than 1, so it is
    kept dense and the second takes the rest: 88 of 200."""
    shapes = {"a": torch.Size([4, 6]), "b": torch.Size([10, 20])}
    assert layer_densities("erk", shapes, [], 0.5, 224) == {"b": pytest.approx(0.44)}
    assert layer_densities("uniform", shapes, [], 0.5, 224) == pytest.approx({"a": 0.5, "b": 0.5})
    conv = {"c": torch.Size([8, 4, 3, 3]), "d": torch.Size([16, 8, 3, 3])}  # ER leaves the kernel out
    er = layer_densities("er", conv, [], 0.9, 288 + 1152)
    assert er["c"] / er["d"] == pytest.approx((12 / 32) / (24 / 128))
    assert er["c"] * 288 + er["d"] * 1152 == pytest.approx(0.1 * 1440)


def test_drop_the_smallest_live_weights_and_grow_where_scores_are_largest():
    mask = torch.tensor([1., 1., 1., 0., 0., 0.])
    weight = torch.tensor([3., -1., 2., 0., 0., 0.])
    new, k = drop_and_grow(mask, weight, torch.tensor([0., 0., 0., 5., 1., 9.]), alpha=1 / 3)
    assert k == 1 and new.tolist() == [1., 0., 1., 0., 0., 1.]
    # a weight just dropped may be regrown (it then restarts from zero, see below)
    new, _ = drop_and_grow(mask, weight, torch.tensor([0., 7., 0., 5., 1., 6.]), alpha=1 / 3)
    assert new.tolist() == mask.tolist()


def test_regrown_and_pruned_weights_restart_from_zero_with_zero_optimizer_state():
    model = nn.Sequential(nn.Linear(3, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1., 2., 3.]]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model[0].weight.grad = torch.ones(1, 3)
    opt.step()
    old = Masks({"0.weight": torch.tensor([[1., 1., 0.]])})
    new = Masks({"0.weight": torch.tensor([[1., 0., 1.]])})  # 1 kept, 2 pruned, 3 regrown
    kept = float(model[0].weight[0, 0].detach())
    restart_changed(model, opt, old, new)
    assert model[0].weight[0].tolist() == [kept, 0.0, 0.0]
    assert opt.state[model[0].weight]["momentum_buffer"][0].tolist() == [1.0, 0.0, 0.0]


def test_rigl_gradient_is_the_dense_one_and_leaves_batch_norm_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).train()
    with torch.no_grad():
        model[0].weight[:, :2] = 0  # pruned: their gradient is still computed
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    before = {n: b.clone() for n, b in model.named_buffers()}
    cfg = make_config().train
    (g,) = dense_gradients(model, [model[0].weight], (x, y), cfg)
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(g, model[0].weight.grad)
    assert bool((g[:, :2] != 0).any())


@pytest.mark.parametrize("method", ["static", "set", "rigl"])
def test_a_dynamic_run_keeps_its_budget_and_moves_its_mask(method, tmp_path):
    summary = run(make_config(*DYNAMIC, f"schedule.method={method}"), tmp_path)
    final = summary["final"]
    assert final["sparsity"] == pytest.approx(0.8, abs=2 / summary["prunable_total"])
    updates = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    updates = [e for e in updates if e["event"] == "mask_update"]
    assert [u["step"] for u in updates] == ([] if method == "static" else [4, 8, 12, 16])
    assert final["mask_updates"] == len(updates)
    assert (final["initial_mask_kept"] == 1.0) == (method == "static")
    assert all(u["dropped"] == u["grown"] for u in updates)
    assert summary["dense_at_step"] == 0


def test_a_run_stopped_between_two_updates_resumes_exactly(monkeypatch, tmp_path):
    cfg = make_config(*DYNAMIC, "schedule.method=set", "train.optimizer=sgd", "train.momentum=0.9")
    reference = run(cfg, tmp_path / "reference")
    with monkeypatch.context() as m:
        StopAfter(m, signal.SIGUSR1, "dynamic", 0, 1)
        with pytest.raises(checkpoint.Interrupted):
            run(cfg, tmp_path / "stopped")
    resumed = run(cfg, tmp_path / "stopped")
    assert without_wall_clock(resumed) == without_wall_clock(reference)
    assert without_wall_clock(read_summary(tmp_path / "stopped")) == without_wall_clock(reference)


@pytest.mark.parametrize("options, message", [
    (["model=lenet5", "granularity=filter"], "needs granularity=unstructured, not granularity=filter"),
    (["schedule.alpha=1.5"], r"schedule.alpha must be in \(0, 1\), got 1.5"),
    (["schedule.every=0"], "schedule.every must be >= 1 step"),
    (["schedule.init=criterion", "criterion=magnitude_increase"], "needs a trained network"),
    (["criterion.exclude=[fc1,fc2,fc3]"], "no prunable layer to make sparse"),
    (["retrain=rewind"], "needs retrain=retain"),
])
def test_what_dynamic_training_refuses_before_training(options, message):
    with pytest.raises(ConfigError, match=message):
        build(make_config(*DYNAMIC, *options))


def test_largest_is_a_stable_sorts_top_k_ties_included():
    from prunebench.schedules.dynamic import largest

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randint(0, 5, (500,), generator=g).float()  # many ties
        k = int(torch.randint(1, 499, (1,), generator=g))
        assert set(largest(x, k).tolist()) == set(torch.sort(x, descending=True, stable=True).indices[:k].tolist())
