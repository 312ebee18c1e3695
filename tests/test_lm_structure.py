"""Physical removal of heads, channels and blocks (prunebench/lm/structure.py): the removed model
computes what the masked one does, and its checkpoints load with plain transformers (in a subprocess
where prunebench cannot be imported)."""

import copy
import json
import os
import subprocess
import sys
import sysconfig

import pytest
import torch
from safetensors import safe_open

from prunebench.config import ConfigError
from prunebench.lm import structure
from prunebench.lm.hub import decoder_blocks

VOCAB = 100


def tiny(family: str, layers: int = 3):
    """A random-init tiny model of the family (weights large enough that greedy tokens are not ties)."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, max_position_embeddings=64,
                  initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    gqa = dict(intermediate_size=48, num_attention_heads=8, num_key_value_heads=2, head_dim=8, **common)
    if family == "llama":  # 8 query heads over 2 KV heads, attention wider than hidden
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**gqa))
    elif family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(sliding_window=4, **gqa))
    elif family == "qwen3":  # RMSNorm per head on q and k
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**gqa))
    elif family == "qwen2":  # q/k/v biases; head_dim 4 from hidden_size; the last layers slide (layer_types)
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**{k: v for k, v in gqa.items() if k != "head_dim"},
                                                   use_sliding_window=True, sliding_window=5, max_window_layers=2))
    else:  # 4 heads, biases everywhere
        model = tf.OPTForCausalLM(tf.OPTConfig(ffn_dim=48, num_attention_heads=4, word_embed_proj_dim=32,
                                               enable_bias=True, init_std=0.2, **common))
    with torch.no_grad():  # random biases, so removing the wrong bias rows shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    return model.eval()


def inputs():
    return torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def logits(model, attention: str = "sdpa"):
    """sdpa finds GQA's group size from the shapes, eager reads the module's num_key_value_groups."""
    model.set_attn_implementation(attention)
    with torch.no_grad():
        return model(inputs()).logits


def head_keep(parts, style: str, generator, per_group: int = None) -> torch.Tensor:
    """'groups': whole KV groups kept; 'query': the same number of query heads kept in every group."""
    a = parts.attention
    keep = torch.zeros(a.kv_heads, a.group_size, dtype=torch.bool)
    if style == "groups":
        count = int(torch.randint(1, a.kv_heads + 1, (1,), generator=generator)) if per_group is None else per_group
        keep[torch.randperm(a.kv_heads, generator=generator)[:count]] = True
    else:
        count = int(torch.randint(1, a.group_size + 1, (1,), generator=generator)) if per_group is None else per_group
        for g in range(a.kv_heads):
            keep[g, torch.randperm(a.group_size, generator=generator)[:count]] = True
    return keep.flatten()


def channel_keep(parts, generator, count: int = None) -> torch.Tensor:
    n = parts.mlp.channels
    count = int(torch.randint(1, n + 1, (1,), generator=generator)) if count is None else count
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=generator)[:count]] = True
    return keep


def prune(model, heads=None, channels=None, seed=0, style=None):
    """Remove heads/channels of every block (random patterns; `heads`/`channels` fix the counts kept
    per group / per block for a uniform result); returns the masked copy computing the same thing."""
    generator = torch.Generator().manual_seed(seed)
    masked = copy.deepcopy(model)
    for parts, masked_parts in zip(structure.layout(model), structure.layout(masked)):
        block_style = style or ("groups", "query")[parts.index % 2]
        hk = head_keep(parts, block_style, generator, heads)
        ck = channel_keep(parts, generator, channels)
        structure.zero_heads(masked_parts, hk)
        structure.zero_channels(masked_parts, ck)
        structure.keep_heads(parts, hk)
        structure.keep_channels(parts, ck)
    return masked


# Loads checkpoints where prunebench cannot be imported: -S skips site-packages' .pth files (the
# editable install's among them), the venv's site-packages is put back by hand. One process serves
# the whole module (importing transformers is most of its time): a line of JSON in, a line out.
ISOLATED = r"""
import json, sys
sys.path.append(sys.argv[1])
try:
    import prunebench
    raise SystemExit("prunebench is importable")
except ImportError:
    pass
import torch
from transformers import AutoModelForCausalLM
import traceback


def serve(request):
    out, ids = {}, torch.load(request["ids"])
    for name, job in request["jobs"].items():
        model = AutoModelForCausalLM.from_pretrained(job["dir"], trust_remote_code=job["remote"]).eval()
        with torch.no_grad():
            result = {"logits": model(ids).logits, "class": type(model).__name__}
            if job.get("generate"):
                result["tokens"] = model.generate(ids, do_sample=False, max_new_tokens=8, use_cache=True)
        out[name] = result
    torch.save(out, request["out"])


for line in sys.stdin:
    try:
        serve(json.loads(line))
        print(json.dumps("done"), flush=True)
    except Exception:
        print(json.dumps(traceback.format_exc()), flush=True)
"""


@pytest.fixture(scope="module")
def load_isolated(tmp_path_factory):
    """load(jobs) -> {name: {"logits", "class", "tokens"?}} for jobs {name: {"dir", "remote",
    "generate"?}}, each loaded by plain transformers (AutoModelForCausalLM) without prunebench."""
    work = tmp_path_factory.mktemp("isolated")
    (work / "load.py").write_text(ISOLATED)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(work / "hf_home")}
    server = subprocess.Popen([sys.executable, "-I", "-S", str(work / "load.py"), sysconfig.get_paths()["purelib"]],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env)

    def load(jobs):
        ids, out = work / "ids.pt", work / "out.pt"
        torch.save(inputs(), ids)
        jobs = {k: {**v, "dir": str(v["dir"])} for k, v in jobs.items()}
        server.stdin.write(json.dumps({"jobs": jobs, "ids": str(ids), "out": str(out)}) + "\n")
        server.stdin.flush()
        line = server.stdout.readline()
        assert line, server.stderr.read()[-3000:]  # it exited
        assert json.loads(line) == "done", json.loads(line)
        return torch.load(out)

    yield load
    if server.poll() is None:
        server.stdin.close()
        server.wait(timeout=60)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "mistral", "qwen3"])
def test_removal_equals_masking(family):
    for seed in range(3):
        model = tiny(family)
        dense_params = sum(p.numel() for p in model.parameters())
        masked = prune(model, seed=seed)
        for attention in ("sdpa", "eager"):
            assert torch.allclose(logits(model, attention), logits(masked, attention), atol=1e-5, rtol=0)
        assert sum(p.numel() for p in model.parameters()) < dense_params
        for parts, sizes in zip(structure.layout(model), structure.block_sizes(model)):
            a = parts.attention
            assert a.q.out_features == a.o.in_features == sizes["heads"] * a.head_dim
            assert a.k.out_features == a.v.out_features == sizes["kv_heads"] * a.head_dim


def test_sizes_from_config_alone():
    assert structure.sizes(tiny("llama").config) == dict(layers=3, heads=8, kv_heads=2, head_dim=8, channels=48,
                                                          hidden=32)
    assert structure.sizes(tiny("opt").config) == dict(layers=3, heads=4, kv_heads=4, head_dim=8, channels=48,
                                                        hidden=32)
    assert structure.family(tiny("qwen2").config) == "llama"


def test_uniform_saves_standard_config(tmp_path, hf_offline, load_isolated):
    """Same sizes in every block: the family's own config, loaded without prunebench or remote code.
    OPT keeps its heads (its config ties their width to hidden_size) and loses channels only."""
    from prunebench.lm.tiny import corpus, train_tokenizer

    tokenizer = train_tokenizer(corpus(50), 300)
    expected, jobs = {}, {}
    for family, heads in (("llama", 1), ("qwen2", 3), ("opt", None)):
        model = tiny(family)
        if family == "opt":
            generator = torch.Generator().manual_seed(0)
            for parts in structure.layout(model):
                structure.keep_channels(parts, channel_keep(parts, generator, 20))
        else:
            prune(model, heads=heads, channels=20, style="query")
        before = state(model)
        info = structure.save(model, tokenizer if family == "llama" else None, tmp_path / family)
        assert_same_state(model, before)
        assert info["layout"] == "standard" and info["config"]["channels"] == 20
        config = json.loads((tmp_path / family / "config.json").read_text())
        assert "auto_map" not in config and not (tmp_path / family / "modeling_pruned.py").exists()
        expected[family], jobs[family] = logits(model), {"dir": tmp_path / family, "remote": False}
    assert config["ffn_dim"] == 20
    assert (tmp_path / "llama" / "tokenizer.json").exists()
    loaded = load_isolated(jobs)
    for family, want in expected.items():
        assert loaded[family]["class"] == type(tiny(family, 1)).__name__
        assert torch.allclose(loaded[family]["logits"], want, atol=1e-5, rtol=0), family


def test_nonuniform_saves_remote_code_or_pad(tmp_path, hf_offline, load_isolated):
    """Different sizes per block (and any OPT heads removed): modeling_pruned.py and per-block sizes,
    or zero units padded up to a standard config; both reload to the same logits."""
    expected, jobs = {}, {}
    for family in ("llama", "qwen2", "opt"):
        model = tiny(family)
        prune(model, seed=1)
        assert len({(s["heads"], s["channels"]) for s in structure.block_sizes(model)}) > 1
        before = state(model)
        remote = structure.save(model, None, tmp_path / f"{family}_remote")
        padded = structure.save(model, None, tmp_path / f"{family}_pad", nonuniform="pad")
        assert_same_state(model, before)
        assert remote["layout"] == "remote_code" and padded["layout"] == "pad"
        saved = [(b["heads"], b["kv_heads"], b["channels"]) for b in remote["config"]["blocks"]]
        assert saved == [(s["heads"], s["kv_heads"], s["channels"]) for s in structure.block_sizes(model)]
        assert (tmp_path / f"{family}_remote" / "modeling_pruned.py").exists()
        assert not (tmp_path / f"{family}_pad" / "modeling_pruned.py").exists()
        expected[family] = logits(model)
        jobs[f"{family}_remote"] = {"dir": tmp_path / f"{family}_remote", "remote": True}
        jobs[f"{family}_pad"] = {"dir": tmp_path / f"{family}_pad", "remote": False}
    assert padded["config"]["heads"] == 4  # OPT's heads padded back to all of them
    loaded = load_isolated(jobs)
    for name, result in loaded.items():
        family = name.split("_")[0]
        assert result["class"].startswith("Pruned") == name.endswith("remote")
        assert torch.allclose(result["logits"], expected[family], atol=1e-5, rtol=0), name


def test_flap_bias_saves_standard_llama(tmp_path, hf_offline, load_isolated):
    """Compensation biases on o_proj/down_proj: a LLaMA config with attention_bias/mlp_bias (zero
    biases on the other projections); Qwen2 has no such setting, so remote code (pad refuses)."""
    jobs, expected = {}, {}
    for family in ("llama", "qwen2"):
        model = tiny(family)
        prune(model, heads=1, channels=30, style="groups")
        generator = torch.Generator().manual_seed(2)
        for parts in structure.layout(model):
            structure.add_to_output_bias(parts.attention.o, torch.randn(32, generator=generator))
            structure.add_to_output_bias(parts.mlp.reader, torch.randn(32, generator=generator))
        expected[family] = logits(model)
        info = structure.save(model, None, tmp_path / family)
        assert model.model.layers[0].self_attn.q_proj.bias is None or family == "qwen2"
        assert model.model.layers[0].mlp.up_proj.bias is None
        jobs[family] = {"dir": tmp_path / family, "remote": info["layout"] == "remote_code"}
        if family == "llama":
            config = json.loads((tmp_path / family / "config.json").read_text())
            assert info["layout"] == "standard" and config["attention_bias"] and config["mlp_bias"]
            with safe_open(tmp_path / family / "model.safetensors", "pt") as saved:  # zero ones beside FLAP's
                assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.mlp.up_proj.bias"} <= set(saved.keys())
        else:
            assert info["layout"] == "remote_code"
            with pytest.raises(ConfigError, match="nonuniform=remote_code"):
                structure.save(model, None, tmp_path / "refused", nonuniform="pad")
    loaded = load_isolated(jobs)
    for family, want in expected.items():
        assert torch.allclose(loaded[family]["logits"], want, atol=1e-5, rtol=0), family


def generate(model, use_cache: bool):
    with torch.no_grad():
        return model.generate(inputs(), do_sample=False, max_new_tokens=8, use_cache=use_cache)


def test_remove_blocks_keeps_the_kv_cache_right(tmp_path, hf_offline, load_isolated):
    """After dropping blocks, cached generation equals uncached, the checkpoint generates the same
    tokens, and it is smaller than the dense one."""
    jobs, expected = {}, {}
    for family in ("llama", "qwen2", "opt"):
        model = tiny(family, layers=4)
        structure.save(model, None, tmp_path / f"{family}_dense")
        dense_params = sum(p.numel() for p in model.parameters())
        structure.remove_blocks(model, [1, 2] if family != "qwen2" else [1])
        assert model.config.num_hidden_layers == len(structure.layout(model))
        assert [b.self_attn.layer_idx for b in decoder_blocks(model)[1]] == list(range(len(
            structure.layout(model))))
        if family == "qwen2":
            assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
        tokens = generate(model, True)
        assert torch.equal(tokens, generate(model, False))
        assert sum(p.numel() for p in model.parameters()) < dense_params
        info = structure.save(model, None, tmp_path / family)
        assert info["layout"] == "standard" and info["config"]["layers"] == model.config.num_hidden_layers
        size = (tmp_path / family / "model.safetensors").stat().st_size
        assert size < (tmp_path / f"{family}_dense" / "model.safetensors").stat().st_size
        expected[family] = tokens
        jobs[family] = {"dir": tmp_path / family, "remote": False, "generate": True}
    loaded = load_isolated(jobs)
    for family, tokens in expected.items():
        assert torch.equal(loaded[family]["tokens"], tokens), family


def test_bad_input_gives_clear_errors():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = tiny("llama")
    parts = structure.layout(model)[0]
    with pytest.raises(ValueError, match="at least one must stay"):
        structure.keep_heads(parts, torch.zeros(8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[3, 1\]"):
        structure.keep_heads(parts, torch.tensor([1, 1, 1, 0, 1, 0, 0, 0], dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        structure.keep_channels(parts, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one must stay"):
        structure.remove_blocks(model, [0, 1, 2])
    assert len(structure.layout(model)) == 3
    with pytest.raises(ConfigError, match="gpt2 model: the supported families are LLaMA-like"):
        structure.family(GPT2Config())
    with pytest.raises(ConfigError, match="gpt2"):
        structure.layout(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB)))
    with pytest.raises(ConfigError, match="nonuniform='zeros' is not one of"):
        structure.save(model, None, "unused", nonuniform="zeros")
