"""criterion=ria: RIA's score, its selections (layer, row, N:M with and without the channel
reallocation), and runs on a classifier and on a tiny language model."""

import math

import pytest
import torch
from conftest import make_config, tiny_lm_config

from prunebench.config import ConfigError
from prunebench.config.options import NMConfig, RiaConfig
from prunebench.core.granularity import NM, Unstructured
from prunebench.core.layerwise import SquaredNorms
from prunebench.criteria.ria import Ria, permuted_nm_keep, reallocation_order, ria_scores
from prunebench.pipeline import run


def stat_of(x):
    stat = SquaredNorms()
    stat(x)
    return stat


def test_the_score_is_relative_importance_times_the_input_norm_to_the_power_a():
    w = torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, -4.0]])
    x = torch.tensor([[1.0, 0.0, 2.0], [1.0, 3.0, 2.0]])  # ‖X_j‖₂ = √2, 3, √8
    # row sums 3, 8; column sums 4, 3, 4
    by_hand = torch.tensor([[1 / 3 + 1 / 4, 2 / 3 + 2 / 3, 0.0], [3 / 8 + 3 / 4, 1 / 8 + 1 / 3, 4 / 8 + 4 / 4]])
    norms = torch.tensor([math.sqrt(2), 3.0, math.sqrt(8)])
    assert torch.allclose(ria_scores(w, stat_of(x).value), by_hand * norms ** 0.5)
    assert torch.allclose(ria_scores(w, stat_of(x).value, a=1.0), by_hand * norms)
    assert torch.allclose(ria_scores(w, stat_of(x).value, a=0.0), by_hand)
    dead = torch.zeros(2, 3)  # an all-zero row or column scores 0, not 0/0
    assert torch.equal(ria_scores(dead, stat_of(x).value), dead)


def layer_and_stat(rows=8, cols=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(rows, cols, generator=g) * torch.rand(cols, generator=g))
    return weight, stat_of(torch.randn(64, cols, generator=g) * torch.exp(torch.randn(cols, generator=g)))


@pytest.mark.parametrize("compare", ["layer", "row"])
def test_the_layer_sparsity_is_exact_and_the_lowest_scores_go(compare):
    weight, stat = layer_and_stat(rows=7, cols=13)
    scores = ria_scores(weight.detach(), stat.value)
    mask = Ria(RiaConfig(name="ria", compare=compare)).prune_layer(weight, stat, torch.ones(7, 13), 0.4, Unstructured())
    assert int((mask == 0).sum()) == (round(0.4 * 91) if compare == "layer" else 7 * round(0.4 * 13))
    assert torch.equal(weight.detach() != 0, mask != 0)
    if compare == "layer":
        assert scores[mask == 0].max() <= scores[mask != 0].min()
    else:
        assert all(scores[i][mask[i] == 0].max() <= scores[i][mask[i] != 0].min() for i in range(7))


def kept_blocks(keep, m, order=None):
    """Weights kept in every block of m, reading the columns in `order` (default: storage order)."""
    keep = keep if order is None else keep[:, order]
    return keep.reshape(-1, m).sum(1)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_n_m_keeps_n_of_every_m_with_and_without_the_permutation(n, m):
    weight, stat = layer_and_stat(rows=12, cols=32)
    nm = NM(NMConfig(name="nm", n=n, m=m))
    plain = Ria(RiaConfig(name="ria")).prune_layer(weight.detach().clone(), stat, torch.ones(12, 32), 1 - n / m, nm)
    assert (kept_blocks(plain != 0, m) == n).all()
    keep, order = permuted_nm_keep(ria_scores(weight.detach(), stat.value), torch.ones(12, 32), nm, m - n)
    assert sorted(order.tolist()) == list(range(32))  # a permutation of the inputs
    assert (kept_blocks(keep, m, order) == n).all() and int(keep.sum()) == 12 * 32 * n // m


def test_the_permutation_keeps_more_score_where_blocks_mix_strong_and_weak_channels():
    # strong channels side by side: plain 2:4 must drop strong weights, reallocation spreads them
    strength = torch.tensor([4.0, 4, 4, 4, 1, 1, 1, 1] * 4)
    g = torch.Generator().manual_seed(1)
    scores = strength * (1 + 0.1 * torch.rand(16, 32, generator=g))
    nm, ones = NM(NMConfig(name="nm", n=2, m=4)), torch.ones(16, 32)
    plain, identity = permuted_nm_keep(scores, ones, nm, 0)  # nothing pruned: nothing to gain
    assert plain.all() and torch.equal(identity, torch.arange(32))
    keep, order = permuted_nm_keep(scores, ones, nm, 2)
    baseline = nm.keep_in_blocks(scores.reshape(-1), 2).reshape(16, 32)
    assert not torch.equal(order, torch.arange(32))
    assert scores[keep].sum() > 1.5 * scores[baseline].sum()
    for seed in range(20):  # never less than the plain choice
        scores = torch.rand(8, 16, generator=torch.Generator().manual_seed(seed)) * torch.rand(16)
        keep, _ = permuted_nm_keep(scores, torch.ones(8, 16), nm, 2)
        assert scores[keep].sum() >= scores[nm.keep_in_blocks(scores.reshape(-1), 2).reshape(8, 16)].sum()


def test_the_reallocation_deals_sorted_channels_into_the_block_positions():
    scores = torch.tensor([[5.0, 1, 7, 3, 8, 2, 6, 4]])  # channels by strength: 1 5 | 3 7 | 0 6 | 2 4
    # position k of the blocks gets quarter k, the 2nd and 4th quarters reversed (the authors' snake)
    assert reallocation_order(scores, 4).tolist() == [1, 7, 0, 4, 5, 3, 6, 2]


def test_a_pruned_weight_stays_pruned_under_the_permutation():
    weight, stat = layer_and_stat(rows=6, cols=16)
    mask = torch.ones(6, 16)
    mask[:, 0] = 0  # pruned before
    keep, order = permuted_nm_keep(ria_scores(weight.detach(), stat.value), mask, NM(NMConfig(name="nm")), 2)
    assert not keep[:, 0].any() and (kept_blocks(keep, 4, order) <= 2).all()


@pytest.mark.parametrize("overrides,message", [
    (["criterion.scope=global"], "criterion.scope must be layer"),
    (["criterion.a=-1"], "criterion.a must be >= 0"),
    (["criterion.compare=column"], "criterion.compare"),
    (["criterion.permute=true"], "needs granularity=nm"),
    (["criterion.permute=true", "granularity=nm", "sparsity=0.5"], "not in storage order"),
])
def test_options_out_of_range_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config("criterion=ria", *overrides)


@pytest.mark.parametrize("extra", [[], ["granularity=nm", "model=lenet5"]])
def test_a_classifier_run_prunes_every_layer_to_the_sparsity(tmp_path, extra):
    summary = run(make_config("criterion=ria", "dataset.num_train=256", "dataset.num_test=128", "sparsity=0.5",
                              "calibration.samples=64", "train.finetune_epochs=0", *extra), tmp_path)
    masks = torch.load(tmp_path / "masks.pt", weights_only=True)
    covered = {n: k for n, k in masks.items() if n != "conv1.weight"}  # lenet5's conv1: 25 inputs, left dense by 2:4
    assert all(int(k.count_nonzero()) == k.numel() // 2 for k in covered.values())
    assert summary["final"]["sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.fixture(scope="module")
def tiny_llama(tiny_lms):
    return tiny_lms["llama"]  # the session's tiny LLaMA (conftest)


def lm_run(path, tmp_path, criterion, *extra):
    cfg = tiny_lm_config(path, tmp_path, f"criterion={criterion}", "criterion.scope=layer", "sparsity=0.5",
                         "dataset.seq_len=64", "calibration.samples=16", *extra)
    return run(cfg, tmp_path / criterion)


def test_a_language_model_is_pruned_exactly_at_50_percent_and_2_4(tiny_llama, tmp_path, hf_offline):
    from prunebench.lm import hub

    for label, extra in (("unstructured", []), ("nm", ["granularity=nm"])):
        s = lm_run(tiny_llama, tmp_path / label, "ria", *extra)
        assert s["status"] == "completed" and s["final"]["sparsity"] == pytest.approx(0.5)
        model = hub.load_model(str(tmp_path / label / "ria" / "model"), None, False, torch.float32, True)
        for layer in hub.block_linears(model).values():
            kept = layer.weight != 0
            assert int(kept.sum()) == layer.weight.numel() // 2
            if extra:
                assert (kept.reshape(-1, 4).sum(1) == 2).all()


def test_perplexity_at_50_percent_ria_wanda_magnitude(tiny_llama, tmp_path, hf_offline):
    ppl = {c: lm_run(tiny_llama, tmp_path, c)["final"]["test_ppl_pruned"] for c in ("ria", "wanda", "magnitude")}
    print("tiny LLaMA, 50% unstructured, pruned perplexity:", ppl)
    assert math.isfinite(ppl["ria"])
