"""Memory and time of block-by-block pruning of a causal LM (lm/blockwise.py), on models of the
published shapes with random weights (no download):

    python scripts/bench_lm_memory.py --shape opt-125m --criterion sparsegpt --samples 16 --seq-len 512
    python scripts/bench_lm_memory.py --shape llama-7b --dtype bfloat16 --criterion wanda --samples 4 --seq-len 128

Prints the model's bytes, the seconds per block (and their ratio to the first shape's when
several are given), and the peak memory the pass needs beyond the model's own weights: on a GPU
torch's peak allocation on the device (what "one block on the device" bounds), on a CPU the
growth of the process's peak resident memory, against the design's estimate (one block, the
hidden states in and out, one group's statistics).
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

import prunebench
from prunebench.core.granularity import Unstructured
from prunebench.lm import hub
from prunebench.lm.blockwise import prune_block_by_block

SHAPES = {  # hidden, layers, ffn, heads, vocab (the published configs)
    "opt-125m": ("opt", 768, 12, 3072, 12, 50272),
    "opt-1.3b": ("opt", 2048, 24, 8192, 32, 50272),
    "llama-7b": ("llama", 4096, 32, 11008, 32, 32000),
}


def build(shape: str, dtype: torch.dtype, context: int):
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    arch, hidden, layers, ffn, heads, vocab = SHAPES[shape]
    if arch == "opt":
        cfg = OPTConfig(hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn, num_attention_heads=heads,
                        vocab_size=vocab, word_embed_proj_dim=hidden, max_position_embeddings=context)
    else:
        cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=ffn,
                          num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                          max_position_embeddings=context)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def rss() -> int:
    """Anonymous resident memory (RssAnon): what the process allocated, not the libraries' code it paged in."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class RssPeak:
    """The most resident memory the process held while inside, sampled every 5 ms in a thread."""

    def __enter__(self) -> "RssPeak":
        self.start, self.peak, self._stop = rss(), rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def estimate(model, samples: int, seq_len: int, criterion: str, dtype: torch.dtype) -> int:
    """One block's weights, the hidden states in and out, one block's statistics, (SparseGPT) the
    working set of one layer's solve, and the selection's in the largest layer."""
    _, blocks = hub.decoder_blocks(model)
    block = blocks[0]
    weights = sum(p.numel() * p.element_size() for p in block.parameters())
    hidden = model.config.hidden_size
    states = 2 * samples * seq_len * hidden * dtype.itemsize
    linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    stats = sum((m.in_features ** 2 * 4 if criterion == "sparsegpt" else m.in_features * 8) for m in linears)
    # SparseGPT's solve of the widest layer: its Hessian, the damped copy and three Cholesky factors
    solve = 5 * max(m.in_features for m in linears) ** 2 * 4 if criterion == "sparsegpt" else 0
    # the selection in the largest layer: float32 scores twice and int64 sort indices per weight
    select = 16 * max(m.weight.numel() for m in linears)
    return weights + states + stats + solve + select


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs="+", choices=list(SHAPES), default=["opt-125m"])
    parser.add_argument("--criterion", choices=["wanda", "sparsegpt"], default="sparsegpt")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dtype, device = hub.DTYPES[args.dtype], torch.device(args.device)
    first = None
    for shape in args.shape:
        model = build(shape, dtype, max(2048, args.seq_len))
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        names = list(hub.block_linears(model))
        crit = prunebench.get_criterion(args.criterion, sequential_unit="block")
        windows = torch.randint(0, model.config.vocab_size, (args.samples, args.seq_len),
                                generator=torch.Generator().manual_seed(0))
        started = time.perf_counter()
        with RssPeak() as host:
            cost = prune_block_by_block(model, dict.fromkeys(names, 0.5), crit, Unstructured(), windows, 1, device)
        seconds = time.perf_counter() - started
        per_block = sum(cost.seconds) / len(cost.seconds)
        first = first or per_block
        if cost.peak_device_bytes:  # the model waits on the CPU: the device holds what the pass needs
            need, where = cost.peak_device_bytes, "peak allocated on the device"
        else:  # the model is in this memory already: what the pass adds to it
            need, where = host.peak - host.start, "peak resident memory added"
        guess = estimate(model, args.samples, args.seq_len, args.criterion, dtype)
        print(f"{shape} ({args.dtype}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
              f"{model_bytes / 2**30:.2f} GiB): {args.criterion}, {args.samples} x {args.seq_len} tokens; "
              f"{len(cost.seconds)} blocks in {seconds:.1f} s, {per_block:.2f} s per block "
              f"({per_block / first:.2f}x the first shape's); {where} {need / 2**30:.2f} GiB "
              f"({need / model_bytes:.3f}x the model's weights), estimate {guess / 2**30:.2f} GiB")
        del model


if __name__ == "__main__":
    main()
