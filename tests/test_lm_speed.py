"""prunebench.lm.speed: what is measured and how (no assertions on timings: they are noise here)."""

import math

import pytest
import torch

from prunebench.lm import speed
from prunebench.lm.tiny import model_config

PROMPT, NEW = 6, 4


def tiny_model(arch="llama", kv_heads=2, layers=2, context=32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model_config(arch, 50, width=32, layers=layers, context=context,
                                                         kv_heads=kv_heads))


def quick(model, **kwargs):
    settings = dict(prompt_tokens=PROMPT, new_tokens=NEW, batch_sizes=(1, 3), repeats=2, warmup=1)
    return speed.measure(model, torch.device("cpu"), **{**settings, **kwargs})


def kv_bytes(layers, kv_heads, head_dim, batch):
    """Keys and values of every layer for the prompt and each fed token (the last argmax is fed too)."""
    return 2 * layers * kv_heads * head_dim * batch * (PROMPT + NEW) * 4


def test_keys_and_positive_finite_numbers():
    model = tiny_model()
    result = quick(model)
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    assert result["threads"] == torch.get_num_threads()
    assert result["params"] == sum(p.numel() for p in model.parameters())
    assert result["weights_bytes"] >= 4 * result["params"]  # + buffers (rotary frequencies)
    assert (result["prompt_tokens"], result["new_tokens"], result["repeats"]) == (PROMPT, NEW, 2)
    for batch in (1, 3):
        row = result[f"batch_{batch}"]
        assert set(row) == {"prefill_tokens_per_s", "decode_tokens_per_s", "prefill_seconds", "decode_seconds",
                            "kv_cache_bytes"}  # no peak memory on a CPU
        assert all(math.isfinite(v) and v > 0 for v in row.values())
        assert row["prefill_tokens_per_s"] == pytest.approx(batch * PROMPT / row["prefill_seconds"])
        assert row["decode_tokens_per_s"] == pytest.approx(batch * NEW / row["decode_seconds"])


@pytest.mark.parametrize("arch, kv_heads", [("llama", 2), ("llama", 4), ("opt", 4)])
def test_kv_cache_bytes_by_hand(arch, kv_heads):
    result = quick(tiny_model(arch, kv_heads=kv_heads, layers=3), repeats=1, warmup=0)
    head_dim = 32 // 4
    for batch in (1, 3):
        assert result[f"batch_{batch}"]["kv_cache_bytes"] == kv_bytes(3, kv_heads, head_dim, batch)


def test_decode_feeds_one_token_with_the_cache():
    model = tiny_model()
    calls = []

    def record(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        calls.append((tuple(kwargs["input_ids"].shape), 0 if cache is None else cache.get_seq_length()))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    quick(model, batch_sizes=(3,), repeats=2, warmup=1)
    handle.remove()
    # per run (1 warmup + 2 repeats): a prefill of the whole prompt, then one token per step over a growing cache
    one_run = [((3, PROMPT), 0)] + [((3, 1), PROMPT + step) for step in range(NEW)]
    assert calls == one_run * 3


def test_model_comes_back_as_it_was_given():
    model = tiny_model()
    model.train()
    model.model.layers[0].eval()  # a mix of modes must survive too
    model.config.use_cache = False
    modes = {name: m.training for name, m in model.named_modules()}
    quick(model, batch_sizes=(1,), repeats=1, warmup=0)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert model.config.use_cache is False
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_memory_and_model_back_on_cpu():
    model = tiny_model()
    result = speed.measure(model, torch.device("cuda"), prompt_tokens=PROMPT, new_tokens=NEW, batch_sizes=(1,),
                           repeats=1, warmup=0)
    assert result["batch_1"]["peak_device_bytes"] >= result["weights_bytes"]
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_prompt_and_new_tokens_must_fit_the_context():
    model = tiny_model(context=16)
    with pytest.raises(ValueError, match="context"):
        quick(model, prompt_tokens=12, new_tokens=5)
    quick(model, prompt_tokens=12, new_tokens=4, batch_sizes=(1,), repeats=1, warmup=0)  # exactly fits


def measurement(params, tokens_per_s, kv, peak=None, **settings):
    """A hand-made measure() result with one batch size (8)."""
    row = {"prefill_tokens_per_s": tokens_per_s[0], "decode_tokens_per_s": tokens_per_s[1], "kv_cache_bytes": kv}
    if peak is not None:
        row["peak_device_bytes"] = peak
    base = {"device": "cpu", "device_name": "x", "threads": 2, "dtype": "float32", "prompt_tokens": 128,
            "new_tokens": 32, "params": params, "batch_8": row}
    return {**base, **settings}


def test_compare_ratios():
    dense = measurement(1000, (200.0, 40.0), kv=800, peak=4000)
    pruned = measurement(500, (300.0, 50.0), kv=400, peak=1000)
    assert speed.compare(dense, pruned) == {
        "params_ratio": 2.0,
        "batch_8": {"prefill_speedup": 1.5, "decode_speedup": 1.25, "kv_cache_ratio": 2.0, "peak_memory_ratio": 4.0}}
    assert "peak_memory_ratio" not in speed.compare(measurement(1, (1, 1), 1), measurement(1, (1, 1), 1))["batch_8"]


@pytest.mark.parametrize("setting, value", [("device", "cuda:0"), ("device_name", "y"), ("threads", 1),
                                            ("dtype", "bfloat16"), ("prompt_tokens", 64), ("new_tokens", 16)])
def test_compare_refuses_different_settings(setting, value):
    dense = measurement(1000, (200.0, 40.0), kv=800)
    with pytest.raises(ValueError, match=setting):
        speed.compare(dense, measurement(500, (300.0, 50.0), kv=400, **{setting: value}))


def test_compare_refuses_different_batch_sizes():
    dense = measurement(1000, (200.0, 40.0), kv=800)
    pruned = measurement(500, (300.0, 50.0), kv=400)
    pruned["batch_1"] = pruned.pop("batch_8")
    with pytest.raises(ValueError, match="batch sizes"):
        speed.compare(dense, pruned)


def test_prefill_asks_for_the_last_logits_only():
    model = tiny_model()
    kept = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: kept.append(kwargs.get("logits_to_keep")),
                                             with_kwargs=True)
    quick(model, batch_sizes=(1,), repeats=1, warmup=0)
    handle.remove()
    assert kept == [1] * (1 + NEW)
