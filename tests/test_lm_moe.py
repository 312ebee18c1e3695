"""Mixtures of experts (lm/moe.py, lm/experts.py): a tiny Mixtral (top-k weights renormalised), a
tiny Qwen2-MoE (plain softmax weights, a shared expert behind a sigmoid gate) and a tiny DeepSeek-V3
(latent attention, a dense first block, sigmoid affinities with correction biases, experts chosen
within the best of two groups), all with fused 3-D expert weights as transformers 5 stores them.
Every expert's matrix is a prunable layer calibrated on the tokens routed to it; whole experts are
removed by frequency, REAP or at random."""

import json

import pytest
import torch
from conftest import make_config, refused_before_weights_load, refused_in_one_line, tiny_lm_config

from prunebench.config import ConfigError
from prunebench.config.options import ReapConfig
from prunebench.core.granularity import build_granularity
from prunebench.criteria import Routed, build_criterion
from prunebench.lm import experts, moe, tiny
from prunebench.lm.blockwise import prune_block_by_block
from prunebench.pipeline import run

pytest.importorskip("transformers")
ARCHS = ["mixtral", "qwen2_moe", "deepseek_v3"]


@pytest.fixture(scope="module")
def moes(tmp_path_factory):
    """{arch: directory with model/ and corpus.txt}: 2 blocks (DeepSeek-V3: the second one MoE),
    width 32, 8 experts, top-2."""
    root = tmp_path_factory.mktemp("moe_lm")
    torch.set_num_threads(2)
    for arch in ARCHS:
        tiny.build(root / arch, arch, sentences=1500, steps=60, width=32, layers=2, kv_heads=2)
    return {arch: root / arch for arch in ARCHS}


@pytest.fixture(autouse=True)
def _offline(hf_offline):
    pass


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path / "model").eval()


def moe_run(path, tmp_path, name, *extra):
    """The run's summary.json, as written."""
    run(tiny_lm_config(path, tmp_path, "dataset.seq_len=32", "calibration.samples=8", "latency.repeats=0", *extra),
        tmp_path / name)
    return json.loads((tmp_path / name / "summary.json").read_text())


def reloaded_ppl(path, tmp_path, run_dir):
    """The test perplexity of a run's saved model, loaded by transformers alone, on the run's windows."""
    from prunebench.lm.recipe import build, perplexity

    exp = build(tiny_lm_config(path, tmp_path, "dataset.seq_len=32", "criterion=magnitude"))
    return perplexity(load(run_dir), exp.data.eval_windows("test", 32, "keep"), 8, torch.device("cpu")).ppl


def zero_fraction(model) -> float:
    weights = moe.block_weights(model)
    return sum(int((w == 0).sum()) for w in weights.values()) / sum(w.numel() for w in weights.values())


# ------------------------------------------------------------------------------ what is prunable
@pytest.mark.parametrize("arch", ARCHS)
def test_every_experts_matrix_is_prunable_and_routers_are_not(moes, arch):
    model = load(moes[arch])
    weights = moe.block_weights(model)
    fused = [n for n, w in weights.items() if w.dim() == 3]
    blocks = [0, 1] if arch != "deepseek_v3" else [1]
    assert fused == [f"model.layers.{i}.mlp.experts.{p}" for i in blocks for p in ("gate_up_proj", "down_proj")]
    assert not any(n.endswith((".mlp.gate.weight", "shared_expert_gate.weight")) for n in weights)
    matrices = {n for n, p in model.named_parameters() if p.dim() >= 2 and ".layers." in n}
    gates = {n for n in matrices if n.endswith((".mlp.gate.weight", "shared_expert_gate.weight"))}
    assert set(weights) == matrices - gates and len(gates) == len(blocks) * (1 + (arch == "qwen2_moe"))


# ------------------------------------------------------------------------------ experts as layers
def routed_rows(model, windows):
    """Block 0's experts inputs in the dense model, by hand: {expert: (tokens routed, down inputs)}."""
    stack = moe.expert_stacks(model)[0]
    caught = []
    handle = stack.experts.register_forward_pre_hook(lambda m, args: caught.append([a.clone() for a in args]))
    with torch.no_grad():
        model(input_ids=windows)
    handle.remove()
    hidden = torch.cat([c[0].reshape(-1, c[0].shape[-1]) for c in caught])
    index = torch.cat([c[1].reshape(hidden.shape[0] if len(caught) == 1 else -1, c[1].shape[-1]) for c in caught])
    w = stack.experts.gate_up_proj.detach()
    out = {}
    for e in range(stack.count):
        x = hidden[(index == e).any(-1)]
        gate, up = (x @ w[e].T).chunk(2, dim=-1)
        out[e] = (x, stack.experts.act_fn(gate) * up)
    return out


def wanda_rows_mask(weight, rows):
    """Half of every output row kept, by |W_ij|·‖X_j‖ (by |W| where no row reaches the layer)."""
    norms = rows.double().pow(2).sum(0).sqrt() if rows.shape[0] else torch.ones(weight.shape[1], dtype=torch.float64)
    scores = weight.abs().double() * norms
    keep = torch.ones_like(weight, dtype=torch.bool)
    keep.scatter_(1, scores.argsort(dim=1, stable=True)[:, :weight.shape[1] // 2], False)
    return keep


@pytest.mark.parametrize("arch", ARCHS)
def test_wanda_prunes_each_expert_from_the_tokens_routed_to_it_and_unrouted_ones_by_magnitude(moes, arch):
    model = load(moes[arch])
    windows = torch.randint(3, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    reference = routed_rows(model, windows)
    unrouted = [e for e, (x, _) in reference.items() if x.shape[0] == 0]
    assert unrouted and len(unrouted) < 8, "the case must hold routed and unrouted experts"
    dense = {n: w.detach().clone() for n, w in moe.block_weights(model).items()}
    cfg = make_config("criterion=wanda", "criterion.sequential=false", fast=False)
    record = prune_block_by_block(model, dict.fromkeys(dense, 0.5), build_criterion(cfg.criterion),
                                  build_granularity(cfg.granularity), windows, 1, torch.device("cpu"))
    stack = moe.expert_stacks(model)[0]
    for e, (x, down_rows) in reference.items():
        for param, rows in (("gate_up_proj", x), ("down_proj", down_rows)):
            name = stack.prefix + param
            pruned = getattr(stack.experts, param).detach()[e]
            assert torch.equal(pruned != 0, wanda_rows_mask(dense[name][e], rows)), (param, e)
            assert torch.equal(pruned[pruned != 0], dense[name][e][pruned != 0])  # Wanda updates nothing
    assert [n for n in record.uncalibrated if n.startswith(stack.prefix)] == \
        [f"{stack.prefix}gate_up_proj[{e}].{part}" for e in unrouted for part in ("gate", "up")] + \
        [f"{stack.prefix}down_proj[{e}]" for e in unrouted]


def test_sparsegpt_reconstructs_every_expert_in_the_nm_pattern(moes):
    model = load(moes["mixtral"])
    dense = {n: w.detach().clone() for n, w in moe.block_weights(model).items()}
    windows = torch.randint(3, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    cfg = make_config("criterion=sparsegpt", "granularity=nm", "sparsity=0.5", fast=False)
    prune_block_by_block(model, dict.fromkeys(dense, 0.5), build_criterion(cfg.criterion),
                         build_granularity(cfg.granularity), windows, 2, torch.device("cpu"))
    for name, w in moe.block_weights(model).items():
        groups = (w.detach() != 0).reshape(-1, 4).sum(1)
        assert torch.all(groups == 2), name  # 2 of every 4 consecutive inputs, in every expert's rows
        if w.dim() == 3:
            kept = w.detach() != 0
            assert not torch.allclose(w.detach()[kept], dense[name][kept])  # the survivors were updated


@pytest.mark.parametrize("arch, criterion", [("mixtral", "wanda"), ("qwen2_moe", "wanda"), ("qwen2_moe", "ria"),
                                             ("deepseek_v3", "sparsegpt")])
def test_a_run_counts_every_experts_weights_and_records_the_routing(moes, tmp_path, arch, criterion):
    s = moe_run(moes[arch], tmp_path, "wanda", f"criterion={criterion}", "sparsity=0.5")
    final, model = s["final"], load(tmp_path / "wanda")
    assert final["sparsity"] == pytest.approx(0.5) and zero_fraction(model) == pytest.approx(0.5)
    assert all(v == pytest.approx(0.5) for fused in final["expert_sparsity"].values() for v in fused)
    dense_model = load(moes[arch])
    for name, p in dense_model.named_parameters():  # routers (and Qwen's shared-expert gate) stay dense
        if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
            assert torch.equal(p, model.get_parameter(name))
    tokens = s["test_tokens"] + s["data"]["eval_windows"]  # every window position is routed
    for routing in (s["dense_routing"], final["routing"]):
        assert routing["blocks"] == ([0, 1] if arch != "deepseek_v3" else [1])
        assert all(sum(t) == 2 * tokens for t in routing["tokens"])
    assert reloaded_ppl(moes[arch], tmp_path, tmp_path / "wanda") == pytest.approx(final["test_ppl"], rel=1e-5)


def test_magnitude_per_layer_prunes_each_expert_alone_and_random_draws_differ_per_expert(moes, tmp_path):
    moe_run(moes["mixtral"], tmp_path, "magnitude", "criterion=magnitude", "criterion.scope=layer", "sparsity=0.5")
    pruned, dense = (load(p).model.layers[0].mlp.experts for p in (tmp_path / "magnitude", moes["mixtral"]))
    for name in ("down_proj", "gate_up_proj"):
        for w, d in zip(getattr(pruned, name).detach(), getattr(dense, name).detach()):
            half = w.shape[0] // 2  # a gate_up holds 2 layers: the gate rows, then the up rows
            layers = [(w, d)] if name == "down_proj" else [(w[:half], d[:half]), (w[half:], d[half:])]
            for p, q in layers:  # each expert's layer keeps its own largest half
                assert int((p == 0).sum()) == p.numel() // 2
                assert p[p != 0].abs().min() >= q[p == 0].abs().max()
    moe_run(moes["mixtral"], tmp_path, "random", "criterion=random", "criterion.scope=layer", "sparsity=0.5")
    masks = load(tmp_path / "random").model.layers[0].mlp.experts.down_proj.detach() != 0
    assert not torch.equal(masks[0], masks[1])  # one random stream for all layers


# ------------------------------------------------------------------------------ whole experts
def test_reap_saliency_is_the_mean_gate_times_output_norm_over_the_routed_tokens():
    g = torch.Generator().manual_seed(0)
    tokens, logits = torch.randn(6, 3, generator=g), torch.randn(6, 4, generator=g)
    index = torch.tensor([[0, 1], [1, 2], [0, 2], [1, 0], [2, 1], [0, 1]])  # expert 3: no token

    def output(rows, e):
        return rows * (e + 1)

    routed = Routed(tokens, torch.softmax(logits, -1), index, torch.ones(6, 2), output, 4)
    for gate in ("score", "renormalized"):
        reap = build_criterion(ReapConfig(name="reap", gate=gate))
        stat = reap.expert_stat(4)
        stat(routed)
        probs = torch.softmax(logits, -1)
        expected = []
        for e in range(4):
            terms = []
            for t in range(6):
                if e in index[t].tolist():
                    p = probs[t, e] / (probs[t, index[t]].sum() if gate == "renormalized" else 1)
                    terms.append(float(p) * float((tokens[t] * (e + 1)).norm()))
            expected.append(sum(terms) / len(terms) if terms else 0.0)
        assert reap.expert_scores(stat, 4, None).tolist() == pytest.approx(expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_experts_removed_by_frequency_are_the_least_chosen_and_the_checkpoint_loads(moes, tmp_path, arch):
    from prunebench.lm.recipe import build

    s = moe_run(moes[arch], tmp_path, "frequency", "criterion=frequency", "granularity=experts", "sparsity=0.25")
    final = s["final"]
    exp = build(tiny_lm_config(moes[arch], tmp_path, "dataset.seq_len=32", "calibration.samples=8",
                               "criterion=frequency", "granularity=experts", "sparsity=0.25"))
    with moe.routing_counts(exp.model) as counted, torch.no_grad():
        exp.model(input_ids=exp.calibration)
    groups = 2 if arch == "deepseek_v3" else 1  # DeepSeek-V3's router: 2 groups of 4, one expert goes from each
    for i, (block, chosen) in enumerate(zip(counted["blocks"], counted["tokens"])):
        assert final["expert_scores"][str(block)] == [float(c) for c in chosen]
        lowest = sorted(g * 8 // groups + int(part.argsort(stable=True)[j])
                        for g, part in enumerate(torch.tensor(chosen).chunk(groups)) for j in range(2 // groups))
        assert final["experts_removed"][str(block)] == lowest
        assert [t is None for t in final["routing"]["tokens"][i]] == [e in lowest for e in range(8)]
    assert final["units_removed"] == 0.25 and final["check_max_abs_difference"] < 1e-4
    assert final["sparsity"] == pytest.approx(1 - final["prunable_remaining"] / s["prunable_total"])
    config = json.loads((tmp_path / "frequency" / "model" / "config.json").read_text())
    key = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "deepseek_v3": "n_routed_experts"}[arch]
    assert config[key] == 6
    reloaded = load(tmp_path / "frequency").model.layers[1].mlp.gate
    assert reloaded.weight.shape[0] == 6
    if arch == "deepseek_v3":  # the correction biases of the experts kept, in their order
        bias = load(moes[arch]).model.layers[1].mlp.gate.e_score_correction_bias
        kept = [e for e in range(8) if e not in final["experts_removed"]["1"]]
        assert torch.equal(reloaded.e_score_correction_bias, bias[kept]) and bias.abs().sum() > 0
    assert reloaded_ppl(moes[arch], tmp_path, tmp_path / "frequency") == pytest.approx(final["test_ppl"], rel=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_removing_experts_computes_what_routing_around_them_does_and_a_wrong_removal_is_caught(moes, arch,
                                                                                               monkeypatch):
    model = load(moes[arch])
    stacks = moe.expert_stacks(model)
    kept = {s.block: [0, 2, 3, 5, 6, 7] for s in stacks}  # 3 of each half: DeepSeek-V3's groups stay whole
    assert experts.remove_checked(model, stacks, kept, None, torch.device("cpu")) < 1e-5
    assert stacks[0].experts.num_experts == 6 and moe.expert_count(model.config) == 6
    original = experts.keep_experts

    def router_not_sliced(stack, keep):
        weight = stack.router.weight.detach().clone()
        original(stack, keep)
        stack.router.weight = torch.nn.Parameter(weight[:len(keep)])  # the first rows, not the kept ones

    monkeypatch.setattr(experts, "keep_experts", router_not_sliced)
    model = load(moes[arch])
    with pytest.raises(RuntimeError, match="computes something else"):
        experts.remove_checked(model, moe.expert_stacks(model), {b: [1, 2, 3, 4, 6, 7] for b in kept}, None,
                               torch.device("cpu"))


@pytest.mark.parametrize("arch", ARCHS)
def test_route_is_what_each_familys_router_computes(moes, arch):
    router = moe.expert_stacks(load(moes[arch]))[0].router
    hidden = torch.randn(40, router.weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, weights, index = router(hidden)
        expected_scores = torch.sigmoid(logits) if arch == "deepseek_v3" else torch.softmax(logits, -1)
        assert torch.allclose(moe.gate_scores(router, logits), expected_scores)
        ours, our_index = moe.route(router, logits, 2)
    order, our_order = index.argsort(dim=-1), our_index.argsort(dim=-1)  # the same experts and weights
    assert torch.equal(index.gather(1, order), our_index.gather(1, our_order))
    assert torch.allclose(weights.float().gather(1, order), ours.gather(1, our_order), atol=1e-6)
    if arch == "deepseek_v3":  # a token's two experts share a group: the better one of the two
        assert torch.equal(index[:, 0] // 4, index[:, 1] // 4)


def test_a_grouped_router_loses_as_many_experts_from_each_group():
    scores = torch.tensor([5.0, 1.0, 7.0, 3.0, 0.5, 0.2, 9.0, 8.0])
    assert experts.best(scores, 6) == [0, 1, 2, 3, 6, 7]  # the 2 lowest overall: both in the second half
    assert experts.best(scores, 6, groups=2) == [0, 2, 3, 4, 6, 7]  # the lowest of each half
    assert experts.experts_to_remove(0.25, 8, 2, (2, 1)) == 2
    for sparsity, groups, message in ((0.125, (2, 1), "the same number from each"),
                                      (0.75, (2, 2), "at least 2 must stay in each"),
                                      (0.5, (4, 2), "at least 2 must stay in each"),
                                      (0.5, (2, 1), None), (0.5, (1, 1), None)):
        if message is None:
            assert experts.experts_to_remove(sparsity, 8, 2, groups) == 4
        else:
            with pytest.raises(ConfigError, match=message):
                experts.experts_to_remove(sparsity, 8, 2, groups)
    with pytest.raises(ConfigError, match="fewer than the 3 experts"):
        experts.experts_to_remove(0.5, 8, 3, (2, 1))  # 2 left per group, a token chooses in one group


@pytest.mark.parametrize("args, message", [
    (["criterion=frequency", "granularity=experts", "sparsity=0.9"], "fewer than the 2 the router sends"),
    (["criterion=reap", "granularity=experts", "sparsity=0.01"], "rounds to no expert"),
    (["criterion=wanda", "granularity=experts", "sparsity=0.25"], "cannot score granularity=experts"),
    (["criterion=reap", "sparsity=0.5"], "set granularity=experts"),
    (["criterion=reap", "granularity=experts", "criterion.gate=top"], "criterion.gate"),
])
def test_bad_expert_pruning_input_is_refused_before_any_weights_load(moes, tmp_path, monkeypatch, args, message):
    refused_before_weights_load(monkeypatch, moes["mixtral"], tmp_path, args, message)


@pytest.mark.parametrize("sparsity, message", [("0.125", "not the same number from each of the router's 2 groups"),
                                               ("0.75", "so at least 2 must stay in each")])
def test_a_removal_that_would_change_deepseeks_groups_is_refused_before_weights_load(moes, tmp_path, monkeypatch,
                                                                                     sparsity, message):
    refused_before_weights_load(monkeypatch, moes["deepseek_v3"], tmp_path,
                                ["criterion=frequency", "granularity=experts", f"sparsity={sparsity}"], message)


def test_expert_granularity_on_a_dense_model_is_one_line_before_weights_load(tiny_lms, tmp_path):
    refused_in_one_line(tiny_lms["llama"], tmp_path, ["criterion=frequency", "granularity=experts", "sparsity=0.25"],
                        "is a dense llama model")


def test_expert_granularity_refuses_classifiers():
    with pytest.raises(ConfigError, match="whole experts of mixture-of-experts language models"):
        make_config("granularity=experts", "criterion=random")


def test_lora_adapts_every_expert_and_merges_after_expert_removal(moes, tmp_path):
    s = moe_run(moes["qwen2_moe"], tmp_path, "lora", "criterion=reap", "granularity=experts", "sparsity=0.25",
                "recovery=lora", "recovery.windows=8")
    final = s["final"]
    # per block: q, k, v, o, the shared expert's gate, up and down, and the two fused expert weights
    assert final["recovery_merged"] and final["recovery_adapted_layers"] == 2 * (4 + 3 + 2)
    assert final["test_ppl"] != final["test_ppl_pruned"]
    assert reloaded_ppl(moes["qwen2_moe"], tmp_path, tmp_path / "lora") == pytest.approx(final["test_ppl"], rel=1e-5)
    s = moe_run(moes["mixtral"], tmp_path, "sparse", "criterion=wanda", "sparsity=0.5", "recovery=lora",
                "recovery.windows=8")
    adapter = json.loads((tmp_path / "sparse" / "model" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_parameters"]) == sorted(
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj"))
    assert zero_fraction(load(tmp_path / "sparse")) == pytest.approx(0.5)  # kept apart: the zeros stay


def test_a_model_with_dense_blocks_between_moe_blocks_loses_experts_only_where_it_has_them(moes, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(moes["qwen2_moe"] / "model")
    config.mlp_only_layers = [0]  # block 0 has a plain MLP (as DeepSeek's first blocks)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    stacks = moe.expert_stacks(model)
    assert [s.block for s in stacks] == [1] and sum(w.dim() == 3 for w in moe.block_weights(model).values()) == 2
    assert experts.remove_checked(model, stacks, {1: [0, 1, 2, 4, 5, 7]}, None, torch.device("cpu")) < 1e-5
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(3, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load(tmp_path).eval()(input_ids=ids).logits, model(input_ids=ids).logits)


FAMILIES = {  # every family moe.ROUTERS names, as a random tiny model: 8 experts, top-2, 2 blocks
    "mixtral": dict(num_local_experts=8),
    "qwen2_moe": dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "qwen3_moe": dict(num_experts=8, moe_intermediate_size=32, norm_topk_prob=True, head_dim=8),
    "olmoe": dict(num_experts=8),
    "deepseek_v3": dict(n_routed_experts=8, moe_intermediate_size=32, n_group=2, topk_group=1, first_k_dense_replace=0,
                        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                        num_key_value_heads=4),
    "glm4_moe": dict(n_routed_experts=8, moe_intermediate_size=32, n_group=2, topk_group=2, first_k_dense_replace=1,
                     head_dim=8),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_listed_routes_as_its_router_and_loses_experts_exactly(family, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    assert set(FAMILIES) == set(moe.ROUTERS)
    config = AutoConfig.for_model(family, **{**dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                    num_experts_per_tok=2), **FAMILIES[family]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    stacks = moe.expert_stacks(model)
    assert stacks and all(moe.router_kind(s.router) == moe.ROUTERS[family] for s in stacks)
    for s in stacks:  # a trained router: biases that move the choice (DeepSeek-V3, GLM-4.5)
        if hasattr(s.router, "e_score_correction_bias"):
            s.router.e_score_correction_bias.uniform_(-0.05, 0.05)
    hidden = torch.randn(30, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, weights, index = stacks[0].router(hidden)
        ours, our_index = moe.route(stacks[0].router, stacks[0].router(hidden)[0], 2)
    assert torch.equal(index.sort(-1).values, our_index.sort(-1).values)
    assert torch.allclose(weights.float().gather(1, index.argsort(-1)), ours.gather(1, our_index.argsort(-1)))
    blocks = [s.block for s in stacks]
    assert experts.remove_checked(model, stacks, dict.fromkeys(blocks, [0, 1, 3, 4, 6, 7]), None,
                                  torch.device("cpu")) < 1e-5
    model.save_pretrained(tmp_path / "model")
    assert moe.expert_count(AutoConfig.from_pretrained(tmp_path / "model")) == 6
    ids = torch.randint(3, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(load(tmp_path).eval()(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_speed_benchmark_removes_experts_as_a_run_does(moes, arch, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "bench_lm_speed.py"
    spec = importlib.util.spec_from_file_location("bench_lm_speed", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_lm_speed", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    dense = load(moes[arch])
    for removed, left in ((0.25, 6), (0.5, 4)):
        smaller, difference = bench.without_experts(dense, removed)
        assert difference < 1e-5 and moe.expert_count(smaller.config) == left
        assert bench.describe_moe(smaller).startswith(f"{left} experts, top-2")
    assert moe.expert_count(dense.config) == 8  # a copy was cut, not the model itself
