import math

import pytest
import torch

from prunebench.config import ConfigError, ScheduleConfig
from prunebench.core.masks import Masks
from prunebench.core.select import SelectOptions, select_by_rank, select_by_threshold

SHAPES = {"a.weight": (30, 40), "b.weight": (20, 30), "c.weight": (10, 20)}


def ones():
    return Masks({n: torch.ones(s) for n, s in SHAPES.items()})


def rand_scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s, generator=g) for n, s in SHAPES.items()}


def removed(masks):
    return sum(int((m == 0).sum()) for _, m in masks.items())


def test_hand_computed_global_selection_removes_the_smallest():
    masks = Masks({"x": torch.ones(2, 3)})
    scores = {"x": torch.tensor([[0.5, -3.0, 0.1], [2.0, 0.2, 1.0]]).abs()}
    new = select_by_rank(scores, masks, target=0.5)
    # |scores| = 0.5 3 0.1 / 2 0.2 1: the three smallest are 0.1, 0.2, 0.5
    assert new["x"].tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]


@pytest.mark.parametrize("target", [0.0, 0.1, 0.5, 0.9, 0.987, 0.999])
def test_global_scope_reaches_target_within_one_weight(target):
    masks = select_by_rank(rand_scores(), ones(), target)
    assert abs(removed(masks) - target * ones().numel()) <= 1


@pytest.mark.parametrize("target", [0.2, 0.5, 0.9])
def test_layer_scope_reaches_target_in_every_layer(target):
    masks = select_by_rank(rand_scores(), ones(), target, SelectOptions(scope="layer"))
    for n, m in masks.items():
        assert abs(int((m == 0).sum()) - target * m.numel()) <= 1, n


def test_pruned_weights_are_never_kept_in_a_later_round():
    first = select_by_rank(rand_scores(0), ones(), 0.5)
    # adversarial scores: the pruned weights now look the most important
    scores = {n: torch.where(first[n] == 0, 10.0, torch.rand(s)) for n, s in SHAPES.items()}
    for scope in ("global", "layer"):
        second = select_by_rank(scores, first, 0.8, SelectOptions(scope=scope))
        for n in SHAPES:
            assert torch.all(second[n][first[n] == 0] == 0)
        assert abs(removed(second) - 0.8 * ones().numel()) <= len(SHAPES)


def test_exclusions_keep_layers_dense_and_sparsity_counts_all_weights():
    opts = SelectOptions(exclude_first=True, exclude_last=True)
    masks = select_by_rank(rand_scores(), ones(), 0.3, opts)
    assert bool(masks["a.weight"].all()) and bool(masks["c.weight"].all())
    assert abs(removed(masks) - 0.3 * ones().numel()) <= 1


def test_min_density_keeps_the_best_weights_of_a_layer():
    scores = rand_scores()
    scores["c.weight"] = scores["c.weight"] - 100  # this layer would be emptied first
    masks = select_by_rank(scores, ones(), 0.5, SelectOptions(min_density=0.05))
    kept_c = int(masks["c.weight"].sum())
    assert kept_c == math.ceil(0.05 * 200)
    best = torch.topk(scores["c.weight"].flatten(), kept_c).indices
    assert torch.all(masks["c.weight"].flatten()[best] == 1)
    assert abs(removed(masks) - 0.5 * ones().numel()) <= 1


def test_unreachable_sparsity_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot be reached"):
        select_by_rank(rand_scores(), ones(), 0.9, SelectOptions(exclude_first=True))
    with pytest.raises(ConfigError, match="every pruned layer"):
        select_by_rank(rand_scores(), ones(), 0.6, SelectOptions(scope="layer", exclude_first=True))


def test_nan_scores_are_refused():
    scores = rand_scores()
    scores["b.weight"][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="b.weight"):
        select_by_rank(scores, ones(), 0.5)


def test_threshold_selection():
    masks = Masks({"x": torch.ones(4)})
    new = select_by_threshold({"x": torch.tensor([0.1, 0.5, 0.49, 2.0])}, masks, {"x": 0.5})
    assert new["x"].tolist() == [0.0, 1.0, 0.0, 1.0]


def test_iterative_schedule_removes_the_same_fraction_of_what_remains():
    targets = ScheduleConfig(name="iterative", rounds=4).targets(0.9)
    assert targets[-1] == pytest.approx(0.9)
    remaining = [1.0] + [1 - t for t in targets]
    fractions = [b / a for a, b in zip(remaining, remaining[1:])]
    assert fractions == pytest.approx([fractions[0]] * 4)


def test_iterative_rate_is_lths_twenty_percent_per_round():
    targets = ScheduleConfig(name="iterative", rounds=None, rate=0.2).targets(0.9)
    assert len(targets) == 11  # 0.8^10 = 0.107 > 0.1, 0.8^11 < 0.1
    assert targets[:10] == pytest.approx([1 - 0.8 ** r for r in range(1, 11)])
    assert targets[-1] == pytest.approx(0.9)
    assert ScheduleConfig(name="oneshot").targets(0.7) == [0.7]


def test_excluding_the_last_layer_excludes_its_bias_too():
    masks = Masks({"a.weight": torch.ones(4, 4), "a.bias": torch.ones(4),
                   "b.weight": torch.ones(2, 4), "b.bias": torch.ones(2)})
    scores = {n: torch.rand(m.shape) for n, m in masks.items()}
    new = select_by_rank(scores, masks, 0.5, SelectOptions(exclude_last=True))
    assert bool(new["b.weight"].all()) and bool(new["b.bias"].all())
    assert removed(new) == round(0.5 * 30)


def test_ties_are_broken_by_position_and_counts_stay_exact():
    g = torch.tensor([[3.0, 1.0, 1.0, 1.0, 2.0, 1.0]])
    new = select_by_rank({"x": g}, Masks({"x": torch.ones(1, 6)}), target=3 / 6)
    assert new["x"].tolist() == [[1.0, 0.0, 0.0, 0.0, 1.0, 1.0]]
    # many ties, many targets: always exactly round(target * n) removed
    scores = {"x": torch.randint(0, 3, (1000,)).float()}
    for target in (0.1, 0.33, 0.5, 0.77, 0.999):
        m = select_by_rank(scores, Masks({"x": torch.ones(1000)}), target)
        assert int((m["x"] == 0).sum()) == round(target * 1000)
