"""Structured (filter/channel) pruning: which units a model has, group scores, selection rules,
compaction to a physically smaller network, Kron-OBD/OBS, and structured runs end to end."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, make_config, read_summary, run_cli
from torch import nn

import prunebench
from prunebench.config import ConfigError, GranularityConfig
from prunebench.criteria import ScoreContext
from prunebench.criteria.kron import damped_inverse, obs_update
from prunebench.core.curvature import kfac_factors
from prunebench.core.granularity import build_granularity
from prunebench.core.masks import Masks
from prunebench.models import build_model, default_config
from prunebench.pipeline import build
from prunebench.schedules.steps import with_coupled
from prunebench.core.select import SelectOptions, select_by_rank
from prunebench.core.structure import Slice, Structure

CIFAR = (3, 32, 32)
MNIST = (1, 28, 28)
TINY = ["dataset.num_train=128", "dataset.num_test=64", "train.batch_size=32"]


def model_of(name, shape, seed=0):
    torch.manual_seed(seed)
    return build_model(default_config(name), shape, 10)


def bound(name, model, shape, reduce="l1"):
    g = build_granularity(GranularityConfig(name=name, reduce=reduce))
    g.bind(model, shape)
    return g


def rand_scores(masks, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.shape, generator=gen, dtype=m.dtype) for n, m in masks.items()}


def kept_units(g, masks):
    return {w: int(g.structure.alive(w, masks[w]).sum()) for w in g.structure.producers}


# ------------------------------------------------------------------------------- structure


def test_resnet20_producers_are_the_first_conv_of_each_block():
    s = Structure.of(model_of("resnet20", CIFAR), CIFAR)
    blocks = [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)]
    assert list(s.producers) == [f"{b}.conv1.weight" for b in blocks]
    assert [p.units for p in s.producers.values()] == [16] * 3 + [32] * 3 + [64] * 3
    assert set(s.skipped) == {"conv1", "fc"} | {f"{b}.conv2" for b in blocks}
    for name, why in s.skipped.items():
        assert ("network's outputs" if name == "fc" else "residual") in why, (name, why)
    assert s.stage_count == 3
    assert [p.stage for p in s.producers.values()] == [0] * 3 + [1] * 3 + [2] * 3
    # a block's conv1 owns its row, its batch norm entries and the next conv's input channel
    assert s.producers["layer2.1.conv1.weight"].slices == [
        Slice("layer2.1.conv1.weight", 0), Slice("layer2.1.bn1.weight", 0), Slice("layer2.1.bn1.bias", 0),
        Slice("layer2.1.conv2.weight", 1)]


def test_vgg16_every_conv_is_a_producer_and_stages_follow_the_pools():
    s = Structure.of(model_of("vgg16", CIFAR), CIFAR)
    assert list(s.producers) == [f"conv{i}.weight" for i in range(1, 14)]
    assert set(s.skipped) == {"fc"} and "network's outputs" in s.skipped["fc"]
    assert s.stage_count == 5
    assert [p.stage for p in s.producers.values()] == [0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    slices = s.producers["conv1.weight"].slices
    assert {Slice("bn1.weight", 0), Slice("bn1.bias", 0), Slice("conv1.weight", 0), Slice("conv2.weight", 1)} \
        == set(slices)
    assert s.producers["conv13.weight"].consumers() == [Slice("fc.weight", 1, 1)]


def test_lenet5_flatten_gives_conv2_a_block_of_fc1_columns():
    s = Structure.of(model_of("lenet5", MNIST), MNIST)
    assert list(s.producers) == ["conv1.weight", "conv2.weight", "fc1.weight"]
    assert set(s.skipped) == {"fc2"}
    # 24x24, 8x8 and flat outputs: fc1 is a stage of its own, not conv2's
    assert {w: p.stage for w, p in s.producers.items()} == {"conv1.weight": 0, "conv2.weight": 1, "fc1.weight": 2}
    assert s.stage_count == 3
    # conv2's 50 maps are 4x4 after the pool: channel j is fc1's input features 16j .. 16j+15
    conv2 = s.producers["conv2.weight"]
    assert conv2.units == 50
    assert conv2.consumers() == [Slice("fc1.weight", 1, 16)]
    assert set(conv2.slices) == {Slice("conv2.weight", 0), Slice("conv2.bias", 0), Slice("fc1.weight", 1, 16)}


# ------------------------------------------------------------------------------ compaction


@torch.no_grad()
def randomize_norms(model, seed=1):
    """Batch norm that is not the identity: random running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen))
            m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
            m.weight.copy_(torch.randn(c, generator=gen) * 0.3 + 1.0)
            m.bias.copy_(torch.randn(c, generator=gen) * 0.3)


@pytest.mark.parametrize("model_name,shape,granularity", [
    ("vgg16", CIFAR, "filter"), ("resnet20", CIFAR, "filter"),
    ("conv4", CIFAR, "channel"), ("lenet5", MNIST, "channel")])
def test_compacted_network_computes_what_the_masked_one_does(model_name, shape, granularity):
    model = model_of(model_name, shape)
    randomize_norms(model)
    dense_params = sum(p.numel() for p in model.parameters())
    dense_out_channels = {n: m.weight.shape[0] for n, m in model.named_modules()
                          if isinstance(m, (nn.Conv2d, nn.Linear))}
    g = bound(granularity, model, shape)
    masks = Masks.ones(model)
    masks = select_by_rank(rand_scores(masks), masks, 0.5, SelectOptions(scope="layer"), g)
    enforced = with_coupled(masks, g, model)
    enforced.apply(model)
    model.eval()
    x = torch.randn((3,) + shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
    small = g.structure.compact(model, masks, shape)
    with torch.no_grad():
        out = small(x)
    assert out.shape == ref.shape
    assert float((out - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))
    # the masked model is untouched; the compacted one has exactly the kept units of each producer
    assert {n: m.weight.shape[0] for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))} == dense_out_channels
    kept = kept_units(g, masks)
    assert all(0 < k < g.structure.producers[w].units for w, k in kept.items())
    for w, p in g.structure.producers.items():
        assert small.get_submodule(p.module).weight.shape[0] == kept[w], w
        for s in p.slices:
            units_there = small.get_parameter(s.param).shape[s.dim]
            assert units_there == kept[w] * s.block, s
    for name in g.structure.skipped:  # non-producers keep their outputs
        assert small.get_submodule(name).weight.shape[0] == dense_out_channels[name]
    # compaction removes exactly what the masks zero: rows, columns, biases, batch norm entries
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    assert sum(p.numel() for p in small.parameters()) == dense_params - zeros


def test_float64_model_compacts_to_the_same_function():
    model = model_of("lenet5", MNIST).double()
    g = bound("filter", model, MNIST)
    masks = Masks.ones(model)
    masks = select_by_rank(rand_scores(masks), masks, 0.7, SelectOptions(scope="global"), g)
    with_coupled(masks, g, model).apply(model)
    small = g.structure.compact(model, masks, MNIST)
    x = torch.randn(2, *MNIST, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(small(x), model.eval()(x), rtol=1e-12, atol=1e-12)
    assert all(p.dtype == torch.float64 for p in small.parameters())


@pytest.mark.parametrize("model_name,shape", [("resnet20", CIFAR), ("lenet5", MNIST)])
def test_a_trained_compact_network_writes_back_into_the_masked_one(model_name, shape):
    """Fine-tuning the compacted network and expanding it back: the masked network then holds
    exactly its parameters and batch norm statistics, and zeros where units were removed."""
    from prunebench.core.structure import expand_into

    model = model_of(model_name, shape)
    randomize_norms(model)
    g = bound("filter", model, shape)
    masks = Masks.ones(model)
    masks = select_by_rank(rand_scores(masks), masks, 0.4, SelectOptions(scope="layer"), g)
    enforced = with_coupled(masks, g, model)
    enforced.apply(model)
    small = g.structure.compact(model, masks, shape)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # stands for fine-tuning: every parameter and statistic moves
        for name, t in [*small.named_parameters(), *small.named_buffers()]:
            if t.is_floating_point():
                t.mul_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.add_(7)
    expand_into(g.structure, model, small, masks)
    enforced.bind(model).check_weights()
    again = g.structure.compact(model, masks, shape)
    mine = {**dict(again.named_parameters()), **dict(again.named_buffers())}
    for name, t in [*small.named_parameters(), *small.named_buffers()]:
        assert torch.equal(mine[name], t), name
    x = torch.randn((2,) + shape, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), small(x), rtol=1e-5, atol=1e-6)


def test_coupled_masks_zero_the_removed_units_bias_and_norm_entries():
    model = model_of("vgg16", CIFAR)
    g = bound("filter", model, CIFAR)
    masks = Masks.ones(model)
    scores = {n: torch.ones_like(m) for n, m in masks.items()}
    scores["conv1.weight"][[3, 7]] = 0.0  # the two lowest units of conv1
    masks = select_by_rank(scores, masks, 0.5, SelectOptions(scope="layer"), g)
    coupled = g.structure.coupled(masks, model)
    assert set(coupled) == {f"bn{i}.{p}" for i in range(1, 14) for p in ("weight", "bias")}
    bn1 = coupled["bn1.weight"]
    assert bn1[3] == 0 and bn1[7] == 0 and int((bn1 == 0).sum()) == 32
    assert torch.equal(coupled["bn1.bias"], bn1)
    # conv2 loses the same input channels as conv1 loses rows
    assert torch.equal((masks["conv2.weight"] == 0).all(dim=(0, 2, 3)), bn1 == 0)


# ----------------------------------------------------------------------------- group scores


@pytest.mark.parametrize("reduce", ["l1", "l2", "sum"])
def test_filter_group_score_reduces_each_producer_row(reduce):
    model = model_of("lenet5", MNIST)
    g = bound("filter", model, MNIST, reduce)
    s = torch.randn(20, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    rows = s.reshape(20, -1).double()
    expected = {"l1": rows.abs().sum(1), "l2": rows.pow(2).sum(1).sqrt(), "sum": rows.sum(1)}[reduce]
    got = g.group_scores("conv1.weight", {"conv1.weight": s})
    torch.testing.assert_close(got.double(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduce", ["l1", "l2", "sum"])
def test_channel_group_score_reads_the_consumer_columns_through_flatten(reduce):
    model = model_of("lenet5", MNIST)
    g = bound("channel", model, MNIST, reduce)
    gen = torch.Generator().manual_seed(0)
    scores = {n: torch.randn(p.shape, generator=gen) for n, p in Masks.ones(model).items()}
    got = g.group_scores("conv2.weight", scores).double()
    fc1 = scores["fc1.weight"].double()  # (500, 800): conv2 -> pool -> flatten -> fc1
    for j in range(50):
        cols = fc1[:, 16 * j:16 * (j + 1)]
        expected = {"l1": cols.abs().sum(), "l2": cols.pow(2).sum().sqrt(), "sum": cols.sum()}[reduce]
        torch.testing.assert_close(got[j], expected, rtol=1e-10, atol=1e-10)
    # conv1's channels are read by conv2's input columns (block 1)
    conv2 = scores["conv2.weight"].double()
    expected = {"l1": conv2.abs().sum(dim=(0, 2, 3)), "l2": conv2.pow(2).sum(dim=(0, 2, 3)).sqrt(),
                "sum": conv2.sum(dim=(0, 2, 3))}[reduce]
    torch.testing.assert_close(g.group_scores("conv1.weight", scores).double(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("granularity", ["filter", "channel"])
def test_unit_scores_from_the_criterion_are_taken_as_they_are(granularity):
    model = model_of("lenet5", MNIST)
    g = bound(granularity, model, MNIST, "l2")
    unit = torch.randn(50)  # negative values too: no |.| or square applies
    scores = {n: torch.ones(p.shape) for n, p in Masks.ones(model).items()}
    scores["conv2.weight"] = unit
    assert torch.equal(g.group_scores("conv2.weight", scores), unit)


# -------------------------------------------------------------------------------- selection


def test_global_selection_keeps_one_unit_in_a_layer_it_would_empty():
    model = model_of("lenet5", MNIST)
    g = bound("filter", model, MNIST)
    masks = Masks.ones(model)
    scores = rand_scores(masks)
    scores["conv1.weight"] = scores["conv1.weight"] - 10.0  # every conv1 unit is the least important
    new = select_by_rank(scores, masks, 0.1, SelectOptions(scope="global"), g)
    kept = kept_units(g, new)
    assert kept["conv1.weight"] == 1
    assert 570 - sum(kept.values()) == round(0.1 * 570)  # the others make up for what conv1 keeps


def test_global_selection_up_to_one_unit_per_layer_and_no_further():
    model = model_of("lenet5", MNIST)
    g = bound("filter", model, MNIST)
    masks = Masks.ones(model)
    most = (570 - 3) / 570  # all units but one per layer
    new = select_by_rank(rand_scores(masks), masks, most, SelectOptions(scope="global"), g)
    assert kept_units(g, new) == {"conv1.weight": 1, "conv2.weight": 1, "fc1.weight": 1}
    with pytest.raises(ConfigError, match="cannot be reached"):
        select_by_rank(rand_scores(masks), masks, 0.999, SelectOptions(scope="global"), g)


def test_stage_scope_removes_each_stage_ratio_in_each_of_its_layers():
    model = model_of("vgg16", CIFAR)
    g = bound("filter", model, CIFAR)
    masks = Masks.ones(model)
    ratios = (0.1, 0.2, 0.3, 0.4, 0.5)
    new = select_by_rank(rand_scores(masks), masks, ratios, SelectOptions(scope="stage"), g)
    kept = kept_units(g, new)
    for w, p in g.structure.producers.items():
        assert p.units - kept[w] == round(ratios[p.stage] * p.units), w
    # conv1..conv2 lose round(6.4) = 6 of 64, conv8 round(204.8) = 205 of 512
    assert kept["conv1.weight"] == 58 and kept["conv8.weight"] == 307


def test_wrong_number_of_stage_ratios_names_the_stages():
    model = model_of("resnet20", CIFAR)
    g = bound("filter", model, CIFAR)
    masks = Masks.ones(model)
    with pytest.raises(ConfigError, match="2 values; this model has 3 stages") as err:
        select_by_rank(rand_scores(masks), masks, (0.1, 0.2), SelectOptions(scope="stage"), g)
    assert "1: layer1.0.conv1, layer1.1.conv1, layer1.2.conv1; 2: layer2.0.conv1" in str(err.value)


def test_unknown_excluded_module_is_a_config_error():
    model = model_of("lenet5", MNIST)
    g = bound("filter", model, MNIST)
    masks = Masks.ones(model)
    with pytest.raises(ConfigError, match="criterion.exclude names no prunable layer: conv9"):
        select_by_rank(rand_scores(masks), masks, 0.3, SelectOptions(scope="global", exclude=("conv9",)), g)
    new = select_by_rank(rand_scores(masks), masks, 0.3, SelectOptions(scope="global", exclude=("conv2",)), g)
    assert kept_units(g, new)["conv2.weight"] == 50



def test_exclude_last_leaves_the_classifier_dense_under_structured_pruning():
    model = model_of("lenet5", MNIST)
    g = bound("filter", model, MNIST)
    masks = Masks.ones(model)
    try:
        new = select_by_rank(rand_scores(masks), masks, 0.3, SelectOptions(scope="layer", exclude_last=True), g)
    except ConfigError:
        return  # refusing the combination would do too
    assert bool(new["fc2.weight"].all()), f"fc2 has {int((new['fc2.weight'] == 0).sum())} pruned weights"


def test_a_granularity_restricted_to_some_owners_can_be_copied():
    import copy

    from prunebench.core.granularity import only

    model = model_of("lenet5", MNIST)
    restricted = only(bound("filter", model, MNIST), ["conv2.weight"])
    assert copy.deepcopy(restricted).owners(Masks.ones(model)) == ["conv2.weight"]


def test_a_pruned_unit_stays_pruned_in_later_rounds():
    model = model_of("lenet5", MNIST)
    g = bound("channel", model, MNIST)
    masks = Masks.ones(model)
    first = select_by_rank(rand_scores(masks, 0), masks, 0.3, SelectOptions(scope="layer"), g)
    gone = {w: ~g.structure.alive(w, first[w]) for w in g.structure.producers}
    # scores that now favour exactly the removed units (even their zeroed columns score highest)
    scores = {n: torch.rand(m.shape, generator=torch.Generator().manual_seed(1)) + 10 * (m == 0)
              for n, m in first.items()}
    second = select_by_rank(scores, first, 0.6, SelectOptions(scope="layer"), g)
    for w, p in g.structure.producers.items():
        alive = g.structure.alive(w, second[w])
        assert not bool(alive[gone[w]].any()), w
        assert p.units - int(alive.sum()) == round(0.6 * p.units), w
    for n in first:
        assert bool((second[n] <= first[n]).all()), n


def test_stage_ratios_are_checked_against_the_models_stages_before_training():
    with pytest.raises(ConfigError, match="2 values; this model has 3 stages: 1: conv1; 2: conv2; 3: fc1"):
        build(make_config(*TINY, "model=lenet5", "granularity=filter", "criterion.scope=stage",
                          "criterion.stage_ratios=[0.1,0.2]"))
    with pytest.raises(ConfigError, match="scope=stage needs granularity=filter or channel"):
        build(make_config(*TINY, "model=lenet5", "criterion.scope=stage"))
    exp = build(make_config(*TINY, "model=lenet5", "granularity=channel", "criterion.scope=stage",
                            "criterion.stage_ratios=[0.1,0.5,0.7]"))
    assert exp.targets == [pytest.approx((0.1, 0.5, 0.7))]


def test_greedy_channel_scoring_ignores_kernels_of_channels_just_removed():
    """Li et al. 2017: layer by layer, a filter's Σ|w| leaves out the kernels that read the
    previous layer's removed channels; `independent` scores every layer on all its kernels."""
    model = model_of("lenet5", MNIST)
    g = bound("filter", model, MNIST)
    ctx = ScoreContext(model, Masks.ones(model))
    W = {n: p.detach().abs() for n, p in model.named_parameters()}

    def top(scores, k):
        keep = torch.zeros(scores.numel(), dtype=torch.bool)
        keep[scores.argsort(descending=True)[:k]] = True
        return keep

    keep1 = top(W["conv1.weight"].sum((1, 2, 3)), 10)
    keep2 = top(W["conv2.weight"][:, keep1].sum((1, 2, 3)), 25)
    keep3 = top(W["fc1.weight"].reshape(500, 50, 16)[:, keep2].sum((1, 2)), 250)
    expected = {"conv1.weight": keep1, "conv2.weight": keep2, "fc1.weight": keep3}
    greedy = prunebench.get_criterion("magnitude", scope="layer", channel_scoring="greedy").prune(ctx, 0.5, g)
    for w, keep in expected.items():
        assert torch.equal(g.structure.alive(w, greedy[w]), keep), w
    independent = prunebench.get_criterion("magnitude", scope="layer").prune(ctx, 0.5, g)
    assert not torch.equal(g.structure.alive("conv2.weight", independent["conv2.weight"]), keep2)


# -------------------------------------------------------------------------------- Kron-OBS


def spd(n, gen):
    m = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return m @ m.T + n * torch.eye(n, dtype=torch.float64)


def kkt_solution(W, S, A, P):
    """argmin ½ vec(δ)ᵀ (S ⊗ A) vec(δ) s.t. δ[P] = -W[P], row-major vec, by the dense KKT system."""
    H = torch.kron(S, A)
    n = W.numel()
    cols = W.shape[1]
    fixed = [p * cols + c for p in P for c in range(cols)]
    C = torch.zeros(len(fixed), n, dtype=W.dtype)
    C[torch.arange(len(fixed)), fixed] = 1.0
    K = torch.cat([torch.cat([H, C.T], 1), torch.cat([C, torch.zeros(len(fixed), len(fixed), dtype=W.dtype)], 1)])
    rhs = torch.cat([torch.zeros(n, dtype=W.dtype), -W.reshape(-1)[fixed]])
    return torch.linalg.solve(K, rhs)[:n].reshape(W.shape), H


def test_obs_update_is_the_constrained_minimum_under_s_kron_a():
    gen = torch.Generator().manual_seed(0)
    S, A = spd(5, gen), spd(4, gen)
    W = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    S_inv = torch.linalg.inv(S)
    P = [1, 3]
    removed = torch.zeros(5, dtype=torch.bool)
    removed[P] = True
    delta = obs_update(W, S_inv, removed)
    expected, H = kkt_solution(W, S, A, P)
    torch.testing.assert_close(delta, expected, rtol=1e-10, atol=1e-10)
    assert torch.allclose((W + delta)[P], torch.zeros(2, 4, dtype=torch.float64), atol=1e-12)
    cost = 0.5 * delta.reshape(-1) @ H @ delta.reshape(-1)
    WP = W[P]
    formula = 0.5 * torch.trace(WP.T @ torch.linalg.inv(S_inv[P][:, P]) @ WP @ A)
    torch.testing.assert_close(cost, formula, rtol=1e-10, atol=0)
    # any other change zeroing rows P costs more
    other = torch.zeros_like(W)  # the same rows zeroed, the others left alone
    other[P] = -W[P]
    assert 0.5 * other.reshape(-1) @ H @ other.reshape(-1) > cost
    # one row j: ½ F_jᵀ A F_j / [S⁻¹]_jj, the kron_obs score
    for j in range(5):
        one = torch.zeros(5, dtype=torch.bool)
        one[j] = True
        d = obs_update(W, S_inv, one)
        torch.testing.assert_close(0.5 * d.reshape(-1) @ H @ d.reshape(-1), 0.5 * W[j] @ A @ W[j] / S_inv[j, j],
                                   rtol=1e-10, atol=0)


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.Tanh(),
                         nn.Linear(5, 4))


def tiny_ctx(model, n=16):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 6, 6, generator=gen), torch.randint(0, 4, (n,), generator=gen)
    split = [(x[:10], y[:10]), (x[10:], y[10:])]
    ctx = ScoreContext(model, Masks.ones(model), batches=lambda: iter(split),
                       generator=torch.Generator().manual_seed(1), input_shape=(1, 6, 6), num_classes=4)
    return ctx, x, y, split


def test_kron_obd_score_is_half_s_jj_times_the_row_quadratic():
    model = tiny_net()
    ctx, x, y, split = tiny_ctx(model)
    crit = prunebench.get_criterion("kron_obd", samples=16, fisher="empirical")
    scores = crit.score(ctx)
    assert set(scores) == {"0.weight", "3.weight", "5.weight"}
    factors = kfac_factors(model, ["0", "3", "5"], split, fisher="empirical")
    for layer, f in factors.items():
        m = model.get_submodule(layer)
        W = torch.cat([m.weight.detach().reshape(m.weight.shape[0], -1), m.bias.detach()[:, None]], 1).double()
        expected = torch.stack([0.5 * f.S[j, j] * (W[j] @ f.A @ W[j]) for j in range(W.shape[0])])
        assert scores[f"{layer}.weight"].shape == (m.weight.shape[0],)
        torch.testing.assert_close(scores[f"{layer}.weight"].double(), expected, rtol=1e-9, atol=0)
    # the Linear layer "3" by hand: S_jj = mean g_j², F_jᵀ A F_j = mean (F_j · ā)²
    with torch.no_grad():
        h = model[2](model[1](model[0](x)))
    s3 = model[3](h).detach().requires_grad_()
    loss = F.cross_entropy(model[5](model[4](s3)), y, reduction="sum")
    g3, = torch.autograd.grad(loss, s3)
    lin = model[3]
    proj = (h @ lin.weight.detach().T + lin.bias.detach()).double()  # F_j · ā_n, ā = [h, 1]
    by_hand = 0.5 * g3.double().pow(2).mean(0) * proj.pow(2).mean(0)
    torch.testing.assert_close(scores["3.weight"].double(), by_hand, rtol=1e-5, atol=0)


def test_kron_obs_scores_and_compensation_follow_the_damped_factors():
    model = tiny_net()
    ctx, x, y, split = tiny_ctx(model)
    crit = prunebench.get_criterion("kron_obs", samples=16, fisher="empirical", damping=0.1)
    scores = crit.score(ctx)
    factors = kfac_factors(model, ["0", "3", "5"], split, fisher="empirical")
    lin = model[3]
    W = torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1).double()
    S_d = factors["3"].S + 0.1 * factors["3"].S.diagonal().mean() * torch.eye(5, dtype=torch.float64)
    S_inv = torch.linalg.inv(S_d)
    torch.testing.assert_close(S_inv, damped_inverse(factors["3"].S, 0.1))
    A = factors["3"].A
    expected = torch.stack([0.5 * (W[j] @ A @ W[j]) / S_inv[j, j] for j in range(5)])
    torch.testing.assert_close(scores["3.weight"].double(), expected, rtol=1e-9, atol=0)
    # remove rows 0 and 2 of layer 3: the others move by the OBS update, the removed ones become 0
    masks = Masks.ones(model)
    m3 = masks["3.weight"].clone()
    m3[[0, 2]] = 0
    masks = Masks({**dict(masks.items()), "3.weight": m3})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = crit.compensate(model, masks, ctx)
    after = torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1).double()
    delta = after - W
    # (A, from 16 examples of 49 inputs, is singular: the minimum is not unique, so the formula, not KKT)
    P = [0, 2]
    expected_delta = -S_inv[:, P] @ torch.linalg.inv(S_inv[P][:, P]) @ W[P]
    torch.testing.assert_close(delta, expected_delta, rtol=1e-5, atol=1e-6)
    assert float(after[P].abs().max()) < 1e-6
    H = torch.kron(S_d, A)
    predicted = 0.5 * expected_delta.reshape(-1) @ H @ expected_delta.reshape(-1)
    assert out["obs_predicted_loss_increase"] == pytest.approx(float(predicted), rel=1e-6)
    for n, p in model.named_parameters():  # the layers without removed rows are untouched
        if not n.startswith("3."):
            assert torch.equal(p.detach(), before[n]), n


# ---------------------------------------------------------------------------------- runs

LOAD_AND_RUN = """
import sys
sys.modules["prunebench"] = None  # importing it would fail: the program must run on torch alone
import torch
program = torch.export.load(sys.argv[1]).module()
xs = torch.load(sys.argv[2])
torch.save([program(x) for x in xs], sys.argv[3])
print(sorted(m for m, mod in sys.modules.items() if m.startswith("prunebench") and mod is not None))
"""


@pytest.mark.slow
def test_filter_run_records_the_compacted_network_and_exports_it(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*FAST, *TINY, "model=lenet5", "granularity=filter", "criterion.scope=layer", "sparsity=0.5",
                   "latency.repeats=1", "latency.batch_sizes=[1,8]", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    summary = read_summary(out)
    final = summary["final"]
    # scope=layer at 0.5: half the units of conv1, conv2 and fc1 go; fc2 (the output) stays
    assert final["channels"] == {"conv1": 10, "conv2": 25, "fc1": 250, "fc2": 10}
    assert final["units_removed"] == pytest.approx(285 / 570)  # half the units of conv1, conv2, fc1
    # conv1 10·25+10, conv2 25·(10·25)+25, fc1 250·(25·16)+250, fc2 10·250+10
    params = 260 + 6275 + 100_250 + 2510
    assert final["params_remaining"] == params
    assert final["compression"] == pytest.approx(summary["params_total"] / params)
    # MACs on 28x28: conv1 24·24·10·25, conv2 8·8·25·10·25, fc1 400·250, fc2 250·10
    macs = final["flops_remaining"]
    assert macs == 144_000 + 400_000 + 100_000 + 2_500
    assert final["flops_reduction"] == pytest.approx(summary["flops"] / macs) and final["flops_reduction"] > 1
    for b in (1, 8):
        assert final[f"compact_latency_b{b}"] > 0 and final[f"speedup_b{b}"] > 0
    # the exported program runs without prunebench and computes what the saved masked model does
    model = build_model(make_config(*FAST, "model=lenet5").model, MNIST, 10)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    model.eval()
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(b, *MNIST, generator=gen) for b in (3, 5, 1)]  # exported with a batch of 2
    torch.save(xs, tmp_path / "x.pt")
    done = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(out / "model_compact.pt2"),
                           str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    ys = torch.load(tmp_path / "y.pt")
    with torch.no_grad():
        for x, y in zip(xs, ys):
            ref = model(x)
            assert y.shape == ref.shape
            assert float((y - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("args,message", [
    (["criterion=kron_obd"], "not granularity=unstructured"),
    (["criterion=synflow", "granularity=filter"], "not granularity=filter"),
    (["granularity=filter", "criterion.sanity=shuffle"], "with granularity=filter use sanity=invert or none"),
    (["granularity.reduce=l1"], "granularity.reduce=l1 applies to filter/channel pruning"),
])
def test_structured_misconfigurations_stop_with_one_line(tmp_path, args, message):
    out = tmp_path / "run"
    proc = run_cli(*FAST, *args, f"hydra.run.dir={out}")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (out / "summary.json").exists() and not (out / "metrics.jsonl").exists()
