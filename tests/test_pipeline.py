import csv
import json

import pytest
import torch
from conftest import make_config, read_summary
from hydra.errors import ConfigCompositionException

from prunebench.config import ConfigError
from prunebench.core.masks import Masks
from prunebench.pipeline import build, run
from prunebench.training.evaluate import evaluate


def load_model_state(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)


def theta0(cfg):
    """θ0 as the pipeline draws it: same seed, same build order."""
    exp = build(cfg)
    return {k: v.clone() for k, v in exp.model.state_dict().items()}


def test_one_shot_run_writes_consistent_records(tmp_path):
    cfg = make_config("sparsity=0.8", "train.eval_every_epoch=true")
    summary = run(cfg, tmp_path)
    assert summary == read_summary(tmp_path)
    final = summary["final"]
    assert final == summary["rounds"][-1]
    # sparsity is what the saved weights really hold
    state = load_model_state(tmp_path)
    masks = Masks.load(tmp_path / "masks.pt")
    zeros = sum(int((state[n] == 0).sum()) for n in masks)
    assert final["sparsity"] == pytest.approx(zeros / summary["prunable_total"])
    assert abs(zeros - 0.8 * summary["prunable_total"]) <= 1
    for n in masks:
        assert torch.all(state[n][masks[n] == 0] == 0)
    total = sum(v.numel() for v in state.values())
    nonzero = sum(int(v.count_nonzero()) for v in state.values())
    assert final["params_remaining"] == nonzero
    assert final["compression"] == pytest.approx(total / nonzero)
    # accuracy is correct/total over the whole test set, and it is the last epoch's
    assert summary["test_examples"] == 512
    assert (final["test_acc"] * 512) == pytest.approx(round(final["test_acc"] * 512))
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last_epoch = [e for e in events if e["event"] == "epoch"][-1]
    assert last_epoch["phase"] == "finetune" and last_epoch["test_acc"] == final["test_acc"]
    assert [e["event"] for e in events].count("round") == 1
    # layers.csv: the dense row (round 0) and the final round agree with the weights
    rows = list(csv.DictReader(open(tmp_path / "layers.csv")))
    assert {r["round"] for r in rows} == {"0", "1"}
    for r in rows:
        if r["round"] == "1":
            assert int(r["nonzero"]) == int(state[r["layer"]].count_nonzero())
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_iterative_rounds_follow_the_schedule_and_never_revive(tmp_path):
    cfg = make_config("schedule=iterative", "schedule.rounds=3", "sparsity=0.9", "criterion=random")
    summary = run(cfg, tmp_path)
    targets = [r["target_sparsity"] for r in summary["rounds"]]
    assert targets == pytest.approx([1 - 0.1 ** (r / 3) for r in (1, 2, 3)])
    for r in summary["rounds"]:
        assert abs(r["sparsity"] - r["target_sparsity"]) * summary["prunable_total"] <= 1
    rows = list(csv.DictReader(open(tmp_path / "layers.csv")))
    for layer in {r["layer"] for r in rows}:
        nonzero = [int(r["nonzero"]) for r in rows if r["layer"] == layer]
        assert nonzero == sorted(nonzero, reverse=True)


def test_rewind_restores_survivors_to_theta0(tmp_path):
    cfg = make_config("retrain=rewind", "train.pretrain_epochs=2", "train.finetune_epochs=0", "sparsity=0.5")
    init = theta0(cfg)
    run(cfg, tmp_path)
    state, masks = load_model_state(tmp_path), Masks.load(tmp_path / "masks.pt")
    for k, v in state.items():
        expected = init[k] * masks[k] if k in masks else init[k]
        assert torch.equal(v, expected), k


def test_rewind_to_epoch_k_restores_the_weights_after_k_epochs(tmp_path):
    cfg = make_config("retrain=rewind", "retrain.rewind_epoch=1", "train.pretrain_epochs=2",
                      "train.finetune_epochs=0", "sparsity=0.5")
    run(cfg, tmp_path / "a")
    # the same data order, stopped after one epoch and not pruned
    ref = make_config("train.pretrain_epochs=1", "train.finetune_epochs=0", "sparsity=0.0")
    run(ref, tmp_path / "b")
    state, masks = load_model_state(tmp_path / "a"), Masks.load(tmp_path / "a" / "masks.pt")
    after_one = load_model_state(tmp_path / "b")
    for k, v in state.items():
        expected = after_one[k] * masks[k] if k in masks else after_one[k]
        assert torch.equal(v, expected), k
    assert not torch.equal(after_one["fc1.weight"], theta0(cfg)["fc1.weight"])


def test_sign_reinit_keeps_the_signs_of_theta0(tmp_path):
    cfg = make_config("retrain=sign_reinit", "train.finetune_epochs=0", "sparsity=0.5")
    init = theta0(cfg)
    run(cfg, tmp_path)
    state, masks = load_model_state(tmp_path), Masks.load(tmp_path / "masks.pt")
    for n in masks:
        kept = masks[n] == 1
        assert torch.equal(torch.sign(state[n][kept]), torch.sign(init[n][kept]))
        assert not torch.equal(state[n][kept].abs(), init[n][kept].abs())
        assert torch.all(state[n][~kept] == 0)


def test_reinit_draws_new_weights_with_the_same_masks(tmp_path):
    cfg = make_config("retrain=reinit", "train.finetune_epochs=0", "sparsity=0.5")
    init = theta0(cfg)
    run(cfg, tmp_path)
    state, masks = load_model_state(tmp_path), Masks.load(tmp_path / "masks.pt")
    kept = masks["fc1.weight"] == 1
    assert not torch.equal(state["fc1.weight"][kept], init["fc1.weight"][kept])
    assert torch.all(state["fc1.weight"][~kept] == 0)


def test_magnitude_std_reports_its_own_sparsity(tmp_path):
    summary = run(make_config("criterion=magnitude_std", "criterion.quality=0.5"), tmp_path)
    assert summary["sparsity_requested"] is None
    assert summary["final"]["target_sparsity"] is None
    # |w| < 0.5 std removes about 38% of a roughly normal layer
    assert 0.2 < summary["final"]["sparsity"] < 0.6


def test_lenet5_runs_and_has_the_caffe_weight_count(tmp_path):
    summary = run(make_config("model=lenet5", "sparsity=0.7"), tmp_path)
    assert summary["prunable_total"] == 430_500
    assert abs(summary["final"]["sparsity"] - 0.7) * 430_500 <= 1


def test_evaluate_counts_every_example_once():
    model = torch.nn.Linear(4, 3)
    x = torch.randn(1001, 4)
    y = torch.randint(0, 3, (1001,))
    result = evaluate(model, ((x[i:i + 300], y[i:i + 300]) for i in range(0, 1001, 300)))
    with torch.no_grad():
        correct = int((model(x).argmax(1) == y).sum())
    assert result.total == 1001 and result.correct == correct
    assert result.accuracy == correct / 1001


def test_unknown_key_or_wrong_type_is_rejected_at_composition():
    with pytest.raises(ConfigCompositionException):
        make_config("criterion.qualty=1")
    with pytest.raises(ConfigCompositionException):
        make_config("train.lr=fast")


@pytest.mark.parametrize("override,message", [
    ("sparsity=1.0", "sparsity must be in"),
    ("schedule=iterative schedule.rounds=0", "schedule.rounds"),
    ("retrain=rewind retrain.rewind_epoch=5", "beyond the pretraining"),
    ("criterion.min_density=2", "min_density"),
])
def test_range_errors_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        make_config(*override.split())


def test_unreachable_sparsity_stops_before_training(tmp_path):
    cfg = make_config("sparsity=0.99", "criterion.exclude_first=true")
    with pytest.raises(ConfigError, match="cannot be reached"):
        run(cfg, tmp_path)
    assert not (tmp_path / "summary.json").exists()


TINY = ["dataset.num_train=128", "dataset.num_test=64", "train.batch_size=32"]


ALL_CRITERIA = ["magnitude", "random", "magnitude_std", "magnitude_increase", "snip", "grasp", "synflow", "obd",
                "obs"]


@pytest.mark.parametrize("criterion", ALL_CRITERIA)
@pytest.mark.parametrize("retrain", ["retain", "rewind", "reinit", "sign_reinit", "isometry"])
@pytest.mark.parametrize("schedule", ["oneshot", "iterative"])
def test_every_combination_runs_and_keeps_its_invariants(tmp_path, criterion, retrain, schedule):
    extra = ["schedule.rounds=2"] if schedule == "iterative" else []
    extra += ["retrain.steps=5"] if retrain == "isometry" else []
    if criterion == "synflow":
        extra.append("criterion.iterations=5")
    if criterion == "obs":
        extra += ["criterion.block_size=8", "criterion.samples=32"]
    cfg = make_config(*TINY, f"criterion={criterion}", f"retrain={retrain}", f"schedule={schedule}",
                      *extra, "sparsity=0.8")
    summary = run(cfg, tmp_path)
    assert len(summary["rounds"]) == (2 if schedule == "iterative" else 1)
    state, masks = load_model_state(tmp_path), Masks.load(tmp_path / "masks.pt")
    for n in masks:
        assert torch.all(state[n][masks[n] == 0] == 0)
    if criterion != "magnitude_std":
        assert abs(summary["final"]["sparsity"] - 0.8) * summary["prunable_total"] <= 1


@pytest.mark.parametrize("criterion", ALL_CRITERIA)
def test_lenet5_with_every_criterion_and_layer_scope(tmp_path, criterion):
    scope = [] if criterion == "magnitude_std" else ["criterion.scope=layer", "criterion.exclude_last=true"]
    scope += ["criterion.block_size=8", "criterion.samples=32"] if criterion == "obs" else []
    summary = run(make_config(*TINY, "model=lenet5", f"criterion={criterion}", *scope, "sparsity=0.5"), tmp_path)
    assert summary["prunable_total"] == 430_500


def test_flops_dense_and_remaining_follow_the_layers(tmp_path):
    summary = run(make_config(*TINY, "model=lenet5", "sparsity=0.6"), tmp_path)
    # by hand, 28x28 input: conv1 24·24·(20·25) + conv2 8·8·(50·20·25) + fc1 800·500 + fc2 500·10
    assert summary["flops"] == 288_000 + 1_600_000 + 400_000 + 5_000 == summary["final"]["flops"]
    rows = [r for r in csv.DictReader(open(tmp_path / "layers.csv")) if r["round"] == "1"]
    expected = sum(int(r["flops"]) * int(r["nonzero"]) // int(r["params"]) for r in rows)
    assert summary["final"]["flops_remaining"] == expected
    assert sum(int(r["flops"]) for r in rows) == summary["flops"]


def test_validation_split_is_reported_and_test_set_untouched(tmp_path):
    summary = run(make_config(*TINY, "dataset.val_size=32"), tmp_path)
    assert summary["test_examples"] == 64
    assert 0.0 <= summary["final"]["val_acc"] <= 1.0 and "dense_val_acc" in summary


@pytest.mark.parametrize("overrides, pretrain, finetune, milestones", [
    ([], 10, 5, None),  # magnitude prunes the trained network: 10 epochs, then fine-tunes 5
    (["criterion=grasp"], 0, 10, None),  # GraSP prunes at init, then the network trains 10 epochs
    (["criterion=snip", "train.pretrain_epochs=3"], 3, 5, None),  # a number decides
    (["criterion=grasp", "schedule=gradual"], 10, 5, None),  # pruning inside training trains `epochs`
    (["model=resnet20", "dataset=cifar10", "criterion=synflow"], 0, 164, [82, 123]),  # with the training recipe
])
def test_a_criterion_prunes_when_its_paper_does_unless_told(overrides, pretrain, finetune, milestones):
    from prunebench.config import finetune_recipe

    train = make_config(*overrides, fast=False).train
    assert (train.pretrain_epochs, train.finetune_epochs) == (pretrain, finetune)
    if milestones is not None:
        after = finetune_recipe(train)
        assert (after.lr, after.lr_milestones, after.weight_decay) == (train.lr, milestones, train.weight_decay)
