"""Measured speed of a causal language model: prefill and cached decoding, in tokens per second.

The project's rule is that a speedup is a measurement on the run's device against the dense
model, never a FLOP ratio. `measure` times one model; `compare` turns a dense and a pruned
measurement taken with the same settings into speedups.

Prefill is one forward of a (batch, prompt_tokens) batch of seeded random token ids (logits of
the last position only, as in generation). Decoding is `new_tokens` single-token steps, each
feeding the previous step's argmax with the KV cache; only the model calls are timed (not the
argmax, not the prefill that fills the cache), and the loop is written here rather than through
`generate`, so nothing else is timed either.
Memory: on CUDA torch's peak allocation per batch size; on a CPU only what is known exactly,
the weights' bytes and the KV cache's bytes at the end of decoding.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch

# settings that make two measurements comparable; batch sizes are compared by their keys
SETTINGS = ("device", "device_name", "dtype", "threads", "prompt_tokens", "new_tokens")


def measure(model, device: torch.device, *, prompt_tokens: int = 128, new_tokens: int = 32,
            batch_sizes: Sequence[int] = (1, 8), repeats: int = 3, warmup: int = 1, seed: int = 0) -> Dict:
    """Prefill and decode tokens/s of `model` on `device` at each batch size (median of `repeats`).

    The model comes back on its device, in its train/eval modes and with its config.use_cache."""
    device = torch.device(device)
    if prompt_tokens < 1 or new_tokens < 1 or repeats < 1 or warmup < 0 or not batch_sizes:
        raise ValueError("prompt_tokens, new_tokens and repeats must be >= 1, warmup >= 0, batch_sizes non-empty")
    context = context_length(model.config)
    if context is not None and prompt_tokens + new_tokens > context:
        raise ValueError(f"prompt_tokens + new_tokens = {prompt_tokens + new_tokens} exceeds the model's "
                         f"context of {context} positions")
    first = next(model.parameters())
    home, modes, use_cache = first.device, {m: m.training for m in model.modules()}, model.config.use_cache
    try:
        model.to(device).eval()
        result = {"device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
                  "dtype": str(first.dtype).replace("torch.", ""),
                  "params": sum(p.numel() for p in model.parameters()), "weights_bytes": weights_bytes(model),
                  "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats}
        for batch in batch_sizes:
            result[f"batch_{batch}"] = measure_batch(model, device, batch, prompt_tokens, new_tokens,
                                                     repeats, warmup, seed)
        return result
    finally:
        model.to(home)
        for module, training in modes.items():
            module.training = training
        model.config.use_cache = use_cache


def measure_batch(model, device: torch.device, batch: int, prompt_tokens: int, new_tokens: int,
                  repeats: int, warmup: int, seed: int) -> Dict:
    """Tokens/s and seconds (medians over repeats) of prefill and decode at one batch size."""
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed + batch)
    prompt = torch.randint(0, vocab, (batch, prompt_tokens), generator=generator).to(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    prefill_times: List[float] = []
    decode_times: List[float] = []
    for i in range(warmup + repeats):
        prefill, decode, kv_bytes = prefill_and_decode(model, prompt, new_tokens)
        if i >= warmup:
            prefill_times.append(prefill)
            decode_times.append(decode)
    prefill, decode = statistics.median(prefill_times), statistics.median(decode_times)
    out = {"prefill_tokens_per_s": batch * prompt_tokens / prefill, "decode_tokens_per_s": batch * new_tokens / decode,
           "prefill_seconds": prefill, "decode_seconds": decode, "kv_cache_bytes": kv_bytes}
    if cuda:
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


@torch.inference_mode()
def prefill_and_decode(model, prompt: torch.Tensor, new_tokens: int):
    """Seconds of the prefill, seconds of the decode steps' model calls, and the cache's bytes at the end."""
    accepted = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in accepted else "past_key_values"
    # only the last position's logits, as generate() asks: the unpruned vocabulary projection of
    # every prompt position would be timed otherwise, and dilute a pruned model's speedup
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
    cuda = prompt.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(prompt.device)) if cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, **last_only)
    sync()
    prefill = time.perf_counter() - start
    cache = returned_cache(out)
    decode = 0.0
    for _ in range(new_tokens):
        token = out.logits[:, -1:].argmax(dim=-1)
        sync()
        start = time.perf_counter()
        out = model(input_ids=token, use_cache=True, **last_only, **{cache_arg: cache})
        sync()
        decode += time.perf_counter() - start
        cache = returned_cache(out)
    return prefill, decode, cache_bytes(cache)


def returned_cache(out):
    """The KV cache a forward returned (`cache` in transformers >= 5.x, `past_key_values` before)."""
    cache = out.get("cache", None)
    return cache if cache is not None else out.get("past_key_values", None)


def cache_bytes(cache) -> int:
    """Bytes of the key and value tensors a cache holds (a transformers Cache or legacy tuples)."""
    if hasattr(cache, "layers"):
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    else:
        tensors = [t for layer in cache for t in layer]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def weights_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def context_length(config) -> Optional[int]:
    """The positions the model can attend over, where its config says (None when it doesn't)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def device_name(device: torch.device) -> str:
    """The GPU's or CPU's model name: timings on different chips are not comparable."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def compare(dense: Dict, pruned: Dict) -> Dict:
    """Speedups of `pruned` against `dense` (>1: faster) and how many times fewer parameters,
    KV-cache bytes and (on CUDA) peak bytes it has; ValueError when the settings differ."""
    for key in SETTINGS:
        if dense.get(key) != pruned.get(key):
            raise ValueError(f"measurements not comparable: {key} is {dense.get(key)!r} dense, "
                             f"{pruned.get(key)!r} pruned")
    batches = sorted(k for k in dense if k.startswith("batch_"))
    if batches != sorted(k for k in pruned if k.startswith("batch_")):
        raise ValueError("measurements not comparable: different batch sizes")
    result = {"params_ratio": ratio(dense["params"], pruned["params"])}
    for key in batches:
        d, p = dense[key], pruned[key]
        row = {"prefill_speedup": ratio(p["prefill_tokens_per_s"], d["prefill_tokens_per_s"]),
               "decode_speedup": ratio(p["decode_tokens_per_s"], d["decode_tokens_per_s"]),
               "kv_cache_ratio": ratio(d["kv_cache_bytes"], p["kv_cache_bytes"])}
        if "peak_device_bytes" in d and "peak_device_bytes" in p:
            row["peak_memory_ratio"] = ratio(d["peak_device_bytes"], p["peak_device_bytes"])
        result[key] = row
    return result


def ratio(a: float, b: float) -> float:
    return a / b if b else math.inf
