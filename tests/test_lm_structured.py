"""Structured pruning of language models (lm/structured.py and the criteria's unit scores): the
formulas on hand-made cases, the allocation's accounting, and whole runs through the CLI's
pipeline on a tiny LLaMA with grouped-query attention (8 query heads over 2 key-value heads) and a
tiny OPT with biases, whose saved checkpoints transformers loads."""

import json

import pytest
import torch
from conftest import make_config, refused_before_weights_load, refused_in_one_line, tiny_lm_config
from torch import nn

from prunebench.config import ConfigError
from prunebench.config.options import AngularConfig, BlockInfluenceConfig, FlapConfig, TaylorConfig, WandaConfig
from prunebench.core.layerwise import Fluctuation, SquaredNorms
from prunebench.criteria import UnitWeights, build_criterion
from prunebench.lm import structured, tiny
from prunebench.pipeline import run

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    """{name: directory with model/ and corpus.txt}: a LLaMA with 8 query heads over 2 key-value
    groups and an OPT with biases, trained briefly once for this file."""
    root = tmp_path_factory.mktemp("structured_lm")
    torch.set_num_threads(2)
    tiny.build(root / "llama", "llama", sentences=2000, steps=120, width=32, layers=4, heads=8, kv_heads=2)
    tiny.build(root / "opt", "opt", sentences=2000, steps=120, width=32, layers=3)
    return {"llama": root / "llama", "opt": root / "opt"}


@pytest.fixture(autouse=True)
def _offline(hf_offline):
    pass


def lm_run(path, tmp_path, name, *extra):
    cfg = tiny_lm_config(path, tmp_path, "dataset.seq_len=32", "calibration.samples=8", "latency.repeats=1",
                         "latency.prompt_tokens=16", "latency.decode_tokens=4", *extra)
    return run(cfg, tmp_path / name)


def reloaded_ppl(path, tmp_path, run_dir, **kwargs):
    """The test perplexity of the checkpoint a run saved, loaded by transformers alone, on the run's windows."""
    from transformers import AutoModelForCausalLM

    from prunebench.lm.recipe import build, perplexity

    exp = build(tiny_lm_config(path, tmp_path, "dataset.seq_len=32", "criterion=magnitude"))
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model", **kwargs)
    windows = exp.data.eval_windows("test", 32, "keep")
    return perplexity(model, windows, 8, torch.device("cpu")).ppl


def logits_of(model_dir, ids, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def unit(reader_in=6, out=3, writers=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    reader = nn.Linear(reader_in, out, bias=False)
    ws = [nn.Linear(out, reader_in, bias=False) for _ in range(writers)]
    with torch.no_grad():
        for layer in [reader, *ws]:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
    return UnitWeights("mlp", reader, ws)


# ------------------------------------------------------------------------------ formulas
def test_fluctuation_is_the_sample_variance_and_mean_over_every_token_merged_batch_by_batch():
    x = torch.randn(50, 7, dtype=torch.float64) * torch.arange(1, 8) + 3
    stat = Fluctuation()
    for part in x.split([1, 13, 36]):
        stat(part)
    assert torch.allclose(stat.variance, x.var(0)) and torch.allclose(stat.mean, x.mean(0))


def test_flap_scores_and_compensation_follow_the_paper():
    u = unit()
    x = torch.randn(40, 6, dtype=torch.float64)
    x[:, 2] = 0.7  # a feature that never fluctuates: removing it loses nothing once compensated
    stat = Fluctuation()
    stat(x)
    flap = build_criterion(FlapConfig(name="flap"))
    scores = flap.feature_scores(u, stat)
    expected = x.var(0) * u.reader.weight.detach().double().pow(2).sum(0)
    assert torch.allclose(scores, expected) and scores[2] < 1e-20
    removed = torch.tensor([False, False, True, False, False, False])
    bias = flap.output_bias(u, stat, removed)
    w = u.reader.weight.detach()
    full = x.float() @ w.T
    without = x.float()[:, ~removed] @ w[:, ~removed].T + bias
    assert torch.allclose(full, without, atol=1e-5)  # exact: the removed feature was a constant
    ifv = build_criterion(FlapConfig(name="flap", metric="ifv")).feature_scores(u, stat)
    assert torch.allclose(ifv, x.var(0))


def test_wanda_sp_and_taylor_and_magnitude_sum_over_a_units_weights():
    u = unit(writers=2)
    rows = torch.randn(30, 6)
    norms = SquaredNorms()
    norms(rows)
    wanda = build_criterion(WandaConfig(name="wanda"))
    w = u.reader.weight.detach()
    expected = (w.abs() * rows.double().pow(2).sum(0).sqrt()).mean(0).float()
    assert torch.allclose(wanda.feature_scores(u, norms), expected)
    magnitude = build_criterion(make_config("criterion=magnitude").criterion)
    expected = w.pow(2).sum(0) + sum(layer.weight.detach().pow(2).sum(1) for layer in u.writers)
    assert torch.allclose(magnitude.feature_scores(u), expected)
    for layer in [u.reader, *u.writers]:
        layer.weight.grad = torch.randn(layer.weight.shape)
    taylor = build_criterion(TaylorConfig(name="taylor"))
    expected = (w * u.reader.weight.grad).abs().sum(0) + sum((layer.weight.detach() * layer.weight.grad).abs().sum(1)
                                                            for layer in u.writers)
    assert torch.allclose(taylor.feature_scores(u), expected)


def test_block_influence_and_angular_remove_the_blocks_that_change_their_input_least():
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(2, 5, 8, generator=g)]
    states = [x]
    for change in (1.0, 0.01, 0.02, 1.0):  # blocks 1 and 2 hardly change their input
        states.append([s + change * torch.randn(s.shape, generator=g) for s in states[-1]])
    bi = build_criterion(BlockInfluenceConfig(name="block_influence"))
    angular = build_criterion(AngularConfig(name="angular"))
    for i in range(4):
        bi.observe(i, states[i], states[i + 1])
        angular.observe(i, states[i], states[i + 1])
    assert bi.blocks_to_remove(2, 4) == [1, 2]
    assert angular.blocks_to_remove(2, 4) == [1, 2]
    cos = torch.nn.functional.cosine_similarity(states[1][0][:, -1].double(), states[3][0][:, -1].double(), dim=-1)
    assert angular.distances(2, 4)[1] == pytest.approx(float(torch.arccos(cos).mean() / torch.pi))


# ------------------------------------------------------------------------------ allocation
SIZES = {"hidden": 64, "head_dim": 8, "heads": 8, "kv_heads": 2, "channels": 192, "layers": 6}


def test_a_unit_costs_its_weights_and_uniform_counts_reach_the_parameter_target():
    groups = structured.UnitCosts.of(SIZES, writers=2, attention="groups")
    assert (groups.attention_units, groups.attention_unit_params) == (2, 8 * 64 * (2 * 4 + 2))
    query = structured.UnitCosts.of(SIZES, writers=2, attention="query")
    assert (query.attention_units, query.attention_unit_params) == (4, 2 * 8 * 64 * 2)
    assert groups.params("heads") == query.params("heads") == 64 * 8 * (2 * 8 + 2 * 2)  # k and v count in both
    for costs in (groups, query):
        for sparsity in (0.2, 0.35, 0.5):
            counts = structured.uniform_counts(sparsity, "width", costs)
            removed = counts["heads"] * costs.attention_unit_params + counts["mlp"] * costs.channel_params
            total = costs.params("heads") + costs.params("mlp")
            assert abs(removed - sparsity * total) <= costs.channel_params / 2
    with pytest.raises(ConfigError, match="at least one must stay"):
        structured.uniform_counts(0.8, "heads", groups)  # 2 key-value groups: 0.8 rounds to both
    assert structured.uniform_counts(0.8, "width", groups)["heads"] == 1  # one stays, the MLP makes up the rest
    with pytest.raises(ConfigError, match="MLP channels"):
        structured.uniform_counts(0.95, "width", groups)


def test_global_allocation_ranks_standardised_scores_and_keeps_a_unit_of_each_module():
    class P:  # the block parts the allocation reads
        class attention:
            heads, kv_heads, head_dim, group_size = 8, 2, 8, 4

    costs = structured.UnitCosts.of(SIZES, writers=2, attention="query")
    g = torch.Generator().manual_seed(0)
    scored = [structured.BlockScores({}, {}, {"heads": torch.rand(8, generator=g, dtype=torch.float64) * (b + 1),
                                              "mlp": torch.rand(192, generator=g, dtype=torch.float64)})
              for b in range(3)]
    keeps = structured.global_keep([P] * 3, scored, costs, 0.5, ("heads", "mlp"), "query")
    removed = sum(int((~k["heads"]).sum()) // 2 * costs.attention_unit_params
                  + int((~k["mlp"]).sum()) * costs.channel_params for k in keeps)
    assert abs(removed - 0.5 * 3 * (costs.params("heads") + costs.params("mlp"))) <= costs.attention_unit_params
    for k in keeps:
        per_group = (~k["heads"]).view(2, 4).sum(1)
        assert per_group[0] == per_group[1] and k["heads"].any() and k["mlp"].any()


# ------------------------------------------------------------------------------ runs
def test_width_pruning_gives_a_smaller_standard_checkpoint_that_transformers_loads(lms, tmp_path):
    s = lm_run(lms["llama"], tmp_path, "flap", "criterion=flap", "granularity=width", "sparsity=0.35")
    final = s["final"]
    assert final["sparsity"] == pytest.approx(0.35, abs=0.01)
    assert final["check_max_abs_difference"] < 1e-4 and final["allocation"] == "uniform"
    assert s["structure"]["layout"] == "standard"
    config = json.loads((tmp_path / "flap" / "model" / "config.json").read_text())
    assert "auto_map" not in config and config["num_key_value_heads"] in (1, 2)
    assert config["attention_bias"] and config["mlp_bias"]  # FLAP's compensation biases
    assert config["intermediate_size"] < 96
    assert final["params_remaining"] < s["params_total"]
    assert {"prefill_speedup", "decode_speedup"} <= set(final["speedup"]["batch_1"])
    assert s["file_bytes"]["model"] < 0.9 * (lms["llama"] / "model" / "model.safetensors").stat().st_size
    assert reloaded_ppl(lms["llama"], tmp_path, tmp_path / "flap") == pytest.approx(final["test_ppl"], rel=1e-5)
    assert final["test_ppl_pruned"] > s["dense_test_ppl"]


@pytest.mark.parametrize("criterion", ["taylor", "wanda", "magnitude"])
def test_query_heads_go_evenly_from_every_group(lms, tmp_path, criterion):
    extra = ["criterion.gradients=blocks"] if criterion == "taylor" else []
    s = lm_run(lms["llama"], tmp_path, criterion, f"criterion={criterion}", "granularity=heads",
               "granularity.attention=query", "sparsity=0.5", *extra)
    blocks = s["final"]["blocks"]
    assert all(b["heads"] == 4 and b["kv_heads"] == 2 for b in blocks)
    config = json.loads((tmp_path / criterion / "model" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 4)


def test_global_allocation_saves_blocks_of_different_sizes_with_their_modeling_file(lms, tmp_path):
    s = lm_run(lms["llama"], tmp_path, "global", "criterion=flap", "granularity=mlp", "sparsity=0.5",
               "granularity.allocation=global")
    channels = [b["channels"] for b in s["final"]["blocks"]]
    assert len(set(channels)) > 1 and sum(channels) == pytest.approx(0.5 * 4 * 96, abs=2)
    assert s["structure"]["layout"] == "remote_code"
    assert reloaded_ppl(lms["llama"], tmp_path, tmp_path / "global",
                        trust_remote_code=True) == pytest.approx(s["final"]["test_ppl"], rel=1e-5)


def test_opt_heads_and_channels_are_removed_with_their_biases(lms, tmp_path):
    s = lm_run(lms["opt"], tmp_path, "opt", "criterion=wanda", "granularity=width", "sparsity=0.3")
    assert s["final"]["check_max_abs_difference"] < 1e-4
    assert s["structure"]["layout"] == "remote_code"  # OPT's attention width is its hidden size in the config
    assert reloaded_ppl(lms["opt"], tmp_path, tmp_path / "opt",
                        trust_remote_code=True) == pytest.approx(s["final"]["test_ppl"], rel=1e-5)


@pytest.mark.parametrize("criterion", ["block_influence", "angular"])
def test_depth_pruning_removes_whole_blocks(lms, tmp_path, criterion):
    s = lm_run(lms["llama"], tmp_path, criterion, f"criterion={criterion}", "granularity=depth", "sparsity=0.5")
    assert len(s["final"]["blocks_removed"]) == 2 and len(s["final"]["blocks"]) == 2
    config = json.loads((tmp_path / criterion / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and "auto_map" not in config
    if criterion == "angular":  # consecutive blocks
        first, second = s["final"]["blocks_removed"]
        assert second == first + 1


@pytest.mark.parametrize("args, message", [
    (["criterion=sparsegpt", "granularity=width"], "cannot score granularity=width"),
    (["criterion=flap", "granularity=unstructured"], "scores structures"),
    (["criterion=flap", "granularity=depth"], "cannot score granularity=depth"),
    (["criterion=block_influence", "granularity=depth", "sparsity=0.95"], "keeps at least 1"),
    (["criterion=flap", "granularity=heads", "sparsity=0.8"], "at least one must stay"),
    (["criterion=flap", "granularity=width", "granularity.attention=some"], "granularity.attention"),
])
def test_bad_structured_input_is_refused_before_any_weights_load(lms, tmp_path, monkeypatch, args, message):
    refused_before_weights_load(monkeypatch, lms["llama"], tmp_path, args, message)


def test_bad_structured_input_is_one_line_from_the_command_line(lms, tmp_path):
    refused_in_one_line(lms["llama"], tmp_path, ["criterion=block_influence", "granularity=depth", "sparsity=0.95"],
                        "keeps at least 1")


def test_structured_granularities_refuse_classifiers():
    with pytest.raises(ConfigError, match="model=hf_causal_lm"):
        make_config("granularity=width", "criterion=magnitude")


def test_structured_presets_set_their_papers_choices():
    flap = make_config("experiment=flap_llama", fast=False)
    assert (flap.criterion.name, flap.granularity.allocation, flap.sparsity, flap.dataset.seq_len,
            flap.calibration.samples) == ("flap", "global", 0.2, 128, 1024)
    short = make_config("experiment=shortgpt_llama", fast=False)
    assert (short.criterion.name, short.granularity.name) == ("block_influence", "depth")
    assert structured.blocks_to_drop(short.sparsity, 32) == 9


@pytest.mark.parametrize("args, message", [
    (["recovery=lora", "recovery.merge=false", "granularity.allocation=global", "granularity.nonuniform=pad"],
     "which they would not fit"),
    (["criterion.sanity=invert"], "selects single weights"),
    (["criterion.exclude=[model.layers.0]"], "selects single weights"),
    (["granularity.reduce=l1"], "scores its width units itself"),
])
def test_options_that_do_not_apply_to_units_are_refused(args, message):
    with pytest.raises(ConfigError, match=message):
        make_config("model=hf_causal_lm", "model.name=m", "dataset=text", "dataset.path=t", "criterion=flap",
                    "granularity=width", *args, fast=False)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_taylor_gradients_block_by_block_equal_the_whole_models(lms, arch):
    from prunebench.lm import hub

    windows = torch.randint(3, 300, (5, 24), generator=torch.Generator().manual_seed(0))
    grads = []
    for accumulate in (structured.accumulate_gradients, structured.gradients_block_by_block):
        model = hub.load_model(str(lms[arch] / "model"), None, False, torch.float32, True)
        accumulate(model, windows, 2, torch.device("cpu"))  # batches of 2, 2 and 1: weighed by their tokens
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    whole, by_block = grads
    assert set(whole) == set(by_block) and all(".layers." in n for n in whole)
    for name in whole:
        assert torch.allclose(whole[name], by_block[name], rtol=1e-4, atol=1e-7), name
