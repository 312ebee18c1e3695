"""N:M semi-structured masks: the pattern, with every weight-scoring criterion and schedule."""

import json

import pytest
import torch
from conftest import make_config
from torch import nn

from prunebench.config import ConfigError
from prunebench.core.granularity import NM, PatternError, build_granularity
from prunebench.core.masks import Masks
from prunebench.pipeline import build, run
from prunebench.core.select import select_by_rank


def nm(n=2, m=4, indivisible="dense") -> NM:
    return build_granularity(make_config("granularity=nm", f"granularity.n={n}", f"granularity.m={m}",
                                         f"granularity.indivisible={indivisible}", f"sparsity={1 - n / m}").granularity)


def test_each_block_keeps_its_n_best_and_ties_go_in_position_order():
    g = torch.tensor([4., 1, 3, 2, 0, 5, 5, 1, 7, 7, 7, 7])
    keep = nm().keep_in_blocks(g, 2)
    assert keep.tolist() == [True, False, True, False, False, True, True, False, False, False, True, True]


def test_a_weight_pruned_before_stays_pruned_even_past_the_block_budget():
    g = torch.tensor([-float("inf"), -float("inf"), -float("inf"), 9.])  # 3 pruned earlier
    assert nm(1, 4).keep_in_blocks(g, 1).tolist() == [False, False, False, True]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 2)  # 4·2·2 = 16 inputs per filter: divisible by 4
        self.odd = nn.Conv2d(6, 3, 3)  # 6·3·3 = 54 inputs: not a multiple of 4
        self.fc = nn.Linear(16, 5)


def brute_force_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest of every m consecutive inputs, one block at a time (ties: later kept)."""
    flat = scores.reshape(-1).tolist()
    keep = []
    for i in range(0, len(flat), m):
        block = flat[i:i + m]
        order = sorted(range(m), key=lambda j: (block[j], j))  # ascending, stable
        keep += [j not in order[:m - n] for j in range(m)]
    return torch.tensor(keep, dtype=torch.float32).reshape(scores.shape)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 2)])
def test_selection_is_exactly_n_of_every_m_along_the_input_dimension(n, m):
    torch.manual_seed(0)
    model = Net()
    masks = Masks.ones(model)
    scores = {k: torch.randn_like(v) for k, v in masks.items()}
    gran = nm(n, m)
    new = select_by_rank(scores, masks, 1 - n / m, granularity=gran)
    for name in gran.owners(masks):
        rows = new[name].reshape(new[name].shape[0], -1)  # (out, in·kh·kw)
        assert torch.equal(rows.reshape(-1, m).sum(1), torch.full((rows.numel() // m,), float(n)))
        assert torch.equal(new[name], brute_force_nm(scores[name], n, m))
    if m == 2:  # 54 inputs: pruned too
        assert gran.owners(masks) == ["conv.weight", "odd.weight", "fc.weight"]
    else:  # left dense, and said so
        assert new["odd.weight"].all() and gran.owners(masks) == ["conv.weight", "fc.weight"]
        assert gran.left_dense(masks) == {"odd.weight": f"input size 54 is not a multiple of m={m}"}
    assert gran.describe(new)["sparsity_in_layers"] == pytest.approx(1 - n / m, abs=0)


def test_the_pattern_checker_catches_a_revived_weight():
    model = Net()
    masks = Masks.ones(model)
    new = select_by_rank({k: v.abs() for k, v in masks.items()}, masks, 0.5, granularity=nm())
    new.apply(model)
    nm().verify(new, dict(model.named_parameters()), 0.5)
    with torch.no_grad():
        model.fc.weight.fill_(1.0)  # every weight back
    with pytest.raises(PatternError, match="fc.weight.s weights keep 4 of a block of 4, more than 2"):
        nm().verify(new, dict(model.named_parameters()), 0.5)


TINY = ["dataset.num_train=256", "dataset.num_test=128", "train.batch_size=64", "model=lenet5",
        "granularity=nm", "sparsity=0.5"]


@pytest.mark.parametrize("criterion", ["magnitude", "snip", "obd", "obs", "synflow", "grasp"])
def test_every_weight_scoring_criterion_gives_the_pattern_after_finetuning(tmp_path, criterion):
    extra = {"obs": ["criterion.samples=64", "criterion.block_size=16"], "obd": ["criterion.samples=64"],
             "synflow": ["criterion.iterations=5"]}.get(criterion, [])
    summary = run(make_config(*TINY, f"criterion={criterion}", *extra), tmp_path)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    layers = summary["granularity"]["layers"]
    assert summary["granularity"]["left_dense"] == {"conv1.weight": "input size 25 is not a multiple of m=4"}
    assert layers == ["conv2.weight", "fc1.weight", "fc2.weight"]
    for name in layers:  # zeros really in the saved weights, exactly 2 of every 4 nonzero at most
        blocks = (state[name].reshape(-1, 4) != 0).sum(1)
        assert int(blocks.max()) <= 2
    kept = sum(int(state[n].count_nonzero()) for n in layers)
    assert kept <= sum(state[n].numel() for n in layers) // 2
    assert summary["granularity"]["sparsity_in_layers"] == 0.5


def test_iterative_rounds_prune_floor_s_m_of_every_block(tmp_path):
    summary = run(make_config(*TINY, "schedule=iterative", "schedule.rounds=2"), tmp_path)
    targets = [r["target_sparsity"] for r in summary["rounds"]]
    assert targets[-1] == 0.5 and 0 < targets[0] < 0.5
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert int((state["fc1.weight"].reshape(-1, 4) != 0).sum(1).max()) <= 2


def test_gradual_pruning_keeps_the_pattern(tmp_path):
    summary = run(make_config(*TINY, "schedule=gradual", "train.pretrain_epochs=2", "schedule.start=0.5",
                              "schedule.end=1.5", "schedule.every=0.5"), tmp_path)
    assert summary["granularity"]["sparsity_in_layers"] == 0.5
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in records if r["event"] == "round"]
    # at 0.4375 of the way, floor(0.4375·4) = 1 of every 4 goes: never beyond the schedule
    assert updates[0]["target_sparsity"] == 0.4375 and 0.24 < updates[0]["sparsity"] <= 0.25


@pytest.mark.parametrize("overrides,message", [
    (["granularity.n=4"], "granularity.n must be in"),
    (["granularity.m=1", "granularity.n=1"], "granularity.m must be >= 2"),
    (["granularity.reduce=l1"], "N:M compares single weights"),
    (["sparsity=0.9"], r"set sparsity=0.5 \(got 0.9\)"),
])
def test_bad_n_m_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config(*TINY, *overrides)


@pytest.mark.parametrize("overrides,message", [

    (["criterion=eigendamage"], "not granularity=nm"),
    (["granularity.indivisible=error"], "conv1.weight: input size 25"),
    (["criterion.sanity=shuffle"], "sanity=shuffle"),
    (["schedule=dynamic"], "needs granularity=unstructured"),
    (["criterion.layer_rates={fc1: 0.5}", "schedule=iterative", "schedule.rounds=2"], "layer_rates"),
    (["criterion.min_density=0.6"], "at most 0.5 of every block"),
])
def test_incompatible_combinations_stop_before_training(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        build(make_config(*TINY, *overrides))


def test_cli_names_the_option_and_writes_nothing(tmp_path):
    from conftest import run_cli

    out = run_cli("dataset=synthetic", *TINY, "sparsity=0.9", f"hydra.run.dir={tmp_path}")
    assert out.returncode != 0 and "set sparsity=0.5" in out.stderr
    assert not (tmp_path / "summary.json").exists()
