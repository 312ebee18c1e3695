"""A ViT's attention heads and MLP channels as structured units (granularity=width|heads|mlp):
masks, selection, compaction, and runs through the classic pipeline."""

import copy

import pytest
import torch
from conftest import FAST, make_config, run_cli

from prunebench.config import ConfigError, GranularityConfig
from prunebench.config.options import ViTConfig
from prunebench.core.granularity import build_granularity
from prunebench.core.masks import Masks
from prunebench.core.select import SelectOptions, select_by_rank
from prunebench.core.structure import expand_into
from prunebench.models import build_model
from prunebench.pipeline import build, run
from prunebench.schedules.steps import with_coupled

MNIST = (1, 28, 28)
WIDTH, HEADS, HIDDEN, HEAD_DIM = 16, 4, 32, 4  # the tiny ViT below
TINY = ["model=vit_tiny", "model.depth=2", f"model.width={WIDTH}", "dataset.num_train=128",
        "dataset.num_test=64", "train.batch_size=32"]


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    model = build_model(ViTConfig(name="vit_tiny", depth=2, width=WIDTH, heads=HEADS), MNIST, 10)
    with torch.no_grad():  # nonzero biases and norms, so a unit left half-removed would show
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.copy_(torch.randn(p.shape) * 0.3 + (1.0 if name.endswith("norm1.weight") else 0.0))
    return model


def bound(name, model, reduce="none"):
    g = build_granularity(GranularityConfig(name=name, reduce=reduce))
    g.bind(model, MNIST)
    return g


def rand_scores(masks, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.shape, generator=gen) for n, m in masks.items()}


def pruned(name, scope="layer", target=0.5, seed=0):
    model = tiny_vit(seed)
    g = bound(name, model)
    masks = Masks.ones(model)
    masks = select_by_rank(rand_scores(masks, seed), masks, target, SelectOptions(scope=scope), g)
    return model, g, masks


def removed_units(g, masks):
    return {p.module: (~g.structure.alive(w, masks[w])).nonzero().squeeze(1).tolist()
            for w, p in g.structure.producers.items()}


# ------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("name", ["heads", "mlp", "width"])
def test_masks_zero_exactly_the_removed_units_weights_and_biases(name):
    model, g, masks = pruned(name)
    enforced = with_coupled(masks, g, model)
    expected = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    for module, units in removed_units(g, masks).items():
        for j in units:
            if module.endswith("attn.q"):  # head j: its rows of q, k, v (and biases), its columns of proj
                block, rows = module[:-2], slice(j * HEAD_DIM, (j + 1) * HEAD_DIM)
                for layer in ("q", "k", "v"):
                    expected[f"{block}.{layer}.weight"][rows] = 0
                    expected[f"{block}.{layer}.bias"][rows] = 0
                expected[f"{block}.proj.weight"][:, rows] = 0
            else:  # channel j: fc1's row and bias, fc2's column
                block = module[:-4]
                expected[f"{block}.fc1.weight"][j] = 0
                expected[f"{block}.fc1.bias"][j] = 0
                expected[f"{block}.fc2.weight"][:, j] = 0
    assert any(removed_units(g, masks).values())
    for n, e in expected.items():
        got = enforced[n] if n in enforced else torch.ones_like(e)
        assert torch.equal(got, e), n


def test_a_unit_score_is_the_l1_of_its_weights_scores_per_weight():
    model = tiny_vit()
    masks = Masks.ones(model)
    scores = {n: torch.randn(m.shape) for n, m in masks.items()}
    g = bound("width", model)
    head = g.group_scores("blocks.1.attn.q.weight", scores)
    rows = lambda n, j: scores[n][j * HEAD_DIM:(j + 1) * HEAD_DIM].abs().sum()  # noqa: E731
    for j in range(HEADS):
        by_hand = sum(rows(f"blocks.1.attn.{x}.weight", j) for x in "qkv")
        by_hand += scores["blocks.1.attn.proj.weight"][:, j * HEAD_DIM:(j + 1) * HEAD_DIM].abs().sum()
        assert float(head[j]) == pytest.approx(float(by_hand) / (4 * HEAD_DIM * WIDTH))
    channel = g.group_scores("blocks.0.mlp.fc1.weight", scores)
    by_hand = scores["blocks.0.mlp.fc1.weight"].abs().sum(1) + scores["blocks.0.mlp.fc2.weight"].abs().sum(0)
    torch.testing.assert_close(channel, by_hand.double() / (2 * WIDTH))
    assert g.group_size("blocks.0.attn.q.weight", masks) == 4 * HEAD_DIM * WIDTH
    assert g.total(masks) == 2 * (4 * WIDTH * WIDTH + 2 * WIDTH * HIDDEN)  # the blocks' attention and MLP weights


# -------------------------------------------------------------------------- selection
def test_layer_scope_removes_the_same_number_from_every_block():
    _, g, masks = pruned("width", "layer", 0.5, seed=3)
    removed = {m: len(u) for m, u in removed_units(g, masks).items()}
    assert removed == {"blocks.0.attn.q": 2, "blocks.1.attn.q": 2, "blocks.0.mlp.fc1": 16, "blocks.1.mlp.fc1": 16}
    assert g.describe(masks) == {"heads": {"blocks.0": 2, "blocks.1": 2},
                                 "mlp_hidden": {"blocks.0": 16, "blocks.1": 16}}
    # sparsity counts the units' weights: half of them here
    assert 1 - sum(int(masks[n].count_nonzero()) for n in masks if "blocks" in n) / g.total(masks) == 0.5


def test_global_scope_compares_heads_and_channels_per_weight():
    """A head owns 4·head_dim·width = 256 weights, a channel 2·width = 32: by their sums every head
    would outrank every channel; per weight, heads scored lower go first."""
    model = tiny_vit()
    g = bound("width", model)
    masks = Masks.ones(model)
    scores = {n: torch.full(m.shape, 1.0 if "attn" in n else 2.0) for n, m in masks.items()}
    for n in ("blocks.0.attn.q.weight", "blocks.1.attn.q.weight"):
        scores[n][:HEAD_DIM] = 0.5  # head 0 of each block: the lowest per weight
    new = select_by_rank(scores, masks, 2 * 256 / g.total(masks), SelectOptions(scope="global"), g)
    assert g.describe(new)["heads"] == {"blocks.0": HEADS - 1, "blocks.1": HEADS - 1}  # head 0's sum: 224 > 64
    assert g.describe(new)["mlp_hidden"] == {"blocks.0": HIDDEN, "blocks.1": HIDDEN}


def test_every_block_keeps_a_head_and_a_channel():
    _, g, masks = pruned("width", "global", 0.8)
    kept = g.describe(masks)
    assert min(kept["heads"].values()) >= 1 and min(kept["mlp_hidden"].values()) >= 1


# ------------------------------------------------------------------------- compaction
@pytest.mark.parametrize("name,scope", [("heads", "layer"), ("heads", "global"), ("mlp", "global"),
                                        ("width", "layer"), ("width", "global")])
def test_the_compacted_vit_computes_what_the_masked_one_does(name, scope):
    model, g, masks = pruned(name, scope, 0.6)
    dense_params = sum(p.numel() for p in model.parameters())
    enforced = with_coupled(masks, g, model)
    enforced.apply(model)
    small = g.structure.compact(model, masks, MNIST)
    x = torch.randn(3, *MNIST, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(small(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    kept = g.describe(masks)
    for i, block in enumerate(small.blocks):
        assert block.attn.heads == kept["heads"].get(f"blocks.{i}", HEADS)
        assert block.attn.q.out_features == block.attn.heads * HEAD_DIM == block.attn.proj.in_features
        assert block.mlp.fc1.out_features == kept["mlp_hidden"].get(f"blocks.{i}", HIDDEN)
    # compaction removes exactly what the masks zero
    zeros = sum(int((m == 0).sum()) for _, m in enforced.items())
    assert sum(p.numel() for p in small.parameters()) == dense_params - zeros
    assert all(block.attn.head_dim == HEAD_DIM for block in small.blocks)


def test_a_trained_compact_vit_writes_back_into_the_masked_one():
    model, g, masks = pruned("width", "global", 0.5)
    with_coupled(masks, g, model).apply(model)
    small = g.structure.compact(model, masks, MNIST)
    with torch.no_grad():  # stands for fine-tuning
        for p in small.parameters():
            p.mul_(1.5).add_(0.1)
    expand_into(g.structure, model, small, masks)
    with_coupled(masks, g, model).bind(model).check_weights()
    x = torch.randn(2, *MNIST)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), small(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- runs
def test_heads_oneshot_run_records_the_compacted_vit(tmp_path):
    summary = run(make_config(*TINY, "granularity=heads", "criterion.scope=layer", "sparsity=0.5",
                              "latency.repeats=1", "latency.batch_sizes=[2]"), tmp_path)
    final = summary["final"]  # check_compact: the compacted network computed what the masked one does
    assert final["channels"]["blocks.0.attn.q"] == final["channels"]["blocks.1.attn.q"] == 2 * HEAD_DIM
    assert final["channels"]["blocks.0.mlp.fc1"] == HIDDEN
    assert final["units_removed"] == 0.5
    assert final["params_remaining"] == summary["params_total"] - 2 * (2 * (4 * HEAD_DIM * WIDTH + 3 * HEAD_DIM))
    assert final["compact_latency_b2"] > 0 and final["speedup_b2"] > 0
    assert (tmp_path / "model_compact.pt2").exists()


@pytest.mark.parametrize("criterion", ["magnitude", "snip"])
def test_width_iterative_run_shrinks_the_vit(tmp_path, criterion):
    summary = run(make_config(*TINY, f"criterion={criterion}", "granularity=width", "schedule=iterative",
                              "schedule.rounds=2", "sparsity=0.6", "train.pretrain_epochs=1"), tmp_path)
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds if r["round"] != "dense"][-2:] == [1, 2]
    params = [r["params_remaining"] for r in rounds if "units_removed" in r]
    assert len(params) == 2 and summary["params_total"] > params[0] > params[1]
    assert rounds[-1]["units_removed"] > 0


# -------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args,message", [
    (["model=lenet300", "granularity=heads"], "granularity=heads removes attention heads and MLP channels of "
                                              "transformers (model=hf_causal_lm, vit_tiny, vit_small); "
                                              "model=lenet300"),
    (["model=vit_tiny", "granularity=depth"], "granularity=depth removes whole decoder blocks of language models"),
    (["model=vit_tiny", "granularity=heads", "criterion=wanda"], "criterion=wanda scores the units of language "
                                                                 "models"),
])
def test_misconfigurations_stop_with_one_line(tmp_path, args, message):
    proc = run_cli(*FAST, *args, f"hydra.run.dir={tmp_path}")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


@pytest.mark.parametrize("args,message", [
    (["granularity=heads", "sparsity=0.8"], "sparsity=0.8 with granularity=heads would leave a block without heads: "
                                            "each block keeps at least one of each, so at most 0.75"),
    (["granularity=width", "sparsity=0.95"], "would leave a block without heads or mlp"),
    (["granularity=heads", "model.prune=[mlp,head]"], "model.prune must include attention"),
    (["granularity=mlp", "granularity.allocation=global"], "granularity.allocation=global applies to language"),
    (["granularity=heads", "criterion.scope=stage"], "criterion.scope=stage and criterion.layer_rates do not apply"),
    (["granularity=width", "criterion.scope=layer", "criterion.channel_scoring=greedy"], "channel_scoring=greedy"),
    (["granularity=heads", "criterion=synflow"], "not granularity=heads"),
])
def test_bad_vit_unit_plans_are_refused_before_training(args, message):
    with pytest.raises(ConfigError, match=None) as e:
        build(make_config(*TINY, *args))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_block_without_heads_is_refused_on_the_command_line_in_one_line(tmp_path):
    proc = run_cli(*FAST, *TINY, "granularity=heads", "sparsity=0.9", f"hydra.run.dir={tmp_path}")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "would leave a block without heads" in lines[0], proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_filter_pruning_of_a_vit_is_unchanged():
    g = bound("filter", copy.deepcopy(tiny_vit()), reduce="l1")
    assert list(g.structure.producers) == ["blocks.0.mlp.fc1.weight", "blocks.1.mlp.fc1.weight"]
