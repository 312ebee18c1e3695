"""What SparseGPT costs, measured here.

1. One layer against its width (rows = columns = d, 2048 calibration tokens, block size 128):
   the time of the Hessian, of the solve (unstructured 50% and 2:4) and the peak memory the
   solve adds (each case in a fresh process: the growth of its peak resident set), with the
   ratios to the narrowest layer beside d³'s (the Cholesky factorisations and the updates).
2. Whole networks, one-shot 50% (sequential calibration, 128 examples): SparseGPT's pruning
   time against Wanda's and magnitude's on the same trained network, LeNet-300-100 and more.
3. Against OBS on LeNet-300-100 (trained here on Fashion-MNIST; --quick: synthetic data):
   pruning time and test accuracy right after pruning (no retraining) at 50% and 90%, from
   prunebench runs that share one pretrained network.

    python scripts/bench_sparsegpt.py [--threads N] [--widths 256 512 1024 2048] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ONE_CASE = """
import json, resource, sys, time, torch
from prunebench.criteria.sparsegpt import sparsegpt_layer
torch.set_num_threads({threads})
d, tokens, nm = {d}, {tokens}, {nm}
g = torch.Generator().manual_seed(0)
x = torch.randn(tokens, d, generator=g) @ torch.randn(d, d, generator=g) / d ** 0.5
w = torch.randn(d, d, generator=g)
alive = torch.ones(d, d, dtype=torch.bool)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
h = 2 * x.T @ x / tokens
t1 = time.perf_counter()
sparsegpt_layer(w, h, 0.5, alive, block_size=128, damp=0.01, nm=nm)
t2 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"hessian_s": t1 - t0, "solve_s": t2 - t1, "peak_mib": (peak - before) / 1024}}))
"""


def layer_case(d: int, nm, threads: int, tokens: int = 2048) -> dict:
    code = ONE_CASE.format(threads=threads, d=d, tokens=tokens, nm=nm)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def widths_table(widths, threads: int) -> None:
    print("1. one layer, d x d, 2048 tokens, block 128: time (ratio to the narrowest), peak MiB added")
    print(f"{'d':>6} {'d^3 ratio':>10} {'H s':>8} {'50% solve s':>12} {'ratio':>7} {'2:4 solve s':>12} "
          f"{'ratio':>7} {'peak MiB':>9} {'weights MiB':>12}")
    base = None
    for d in widths:
        un, nm = layer_case(d, None, threads), layer_case(d, (4, 2), threads)
        base = base or (d, un["solve_s"], nm["solve_s"])
        print(f"{d:>6} {(d / base[0]) ** 3:>10.1f} {un['hessian_s']:>8.3f} {un['solve_s']:>12.3f} "
              f"{un['solve_s'] / base[1]:>7.1f} {nm['solve_s']:>12.3f} {nm['solve_s'] / base[2]:>7.1f} "
              f"{max(un['peak_mib'], nm['peak_mib']):>9.1f} {d * d * 4 / 2 ** 20:>12.1f}")


def prunebench_run(out: Path, *overrides: str) -> dict:
    from prunebench import compose
    from prunebench.pipeline import run

    return run(compose(*overrides), out)


def pretrained(work: Path, model: str, data: list, epochs: int) -> Path:
    """A dense network trained once (sparsity 0, no fine-tuning): every method prunes this one."""
    summary = prunebench_run(work / f"dense_{model}", f"model={model}", *data, "sparsity=0.0",
                             f"train.pretrain_epochs={epochs}", "train.finetune_epochs=0", "latency.repeats=0")
    print(f"   {model}: dense test acc {summary['dense_test_acc']:.4f} after {epochs} epochs")
    return work / f"dense_{model}" / "model.pt"


def pruned(work: Path, model: str, data: list, checkpoint: Path, criterion: str, sparsity: float, *extra) -> dict:
    tag = "_".join([model, criterion, str(sparsity), *[e.replace("=", "-") for e in extra]])
    summary = prunebench_run(work / tag, f"model={model}", *data, f"model.checkpoint={checkpoint}",
                             f"criterion={criterion}", f"sparsity={sparsity}", "train.pretrain_epochs=0",
                             "train.finetune_epochs=0", "latency.repeats=0", *extra)
    return summary["rounds"][-1]


def networks_table(work: Path, data: list, models, epochs: int) -> None:
    print("2. whole networks, one-shot 50% unstructured: pruning seconds (ratio to magnitude), acc after pruning")
    for model in models:
        ckpt = pretrained(work, model, data, epochs)
        rows = {c: pruned(work, model, data, ckpt, c, 0.5) for c in ("magnitude", "wanda", "sparsegpt")}
        base = rows["magnitude"]["score_seconds"]
        cells = [f"{c} {r['score_seconds']:.2f} s ({r['score_seconds'] / base:.0f}x), acc {r['test_acc_pruned']:.4f}"
                 for c, r in rows.items()]
        print(f"   {model}: " + "; ".join(cells))


def obs_table(work: Path, data: list, epochs: int, samples: int) -> None:
    print(f"3. LeNet-300-100: SparseGPT (128 samples) against OBS (block 128, {samples} samples): pruning seconds, "
          f"acc after pruning")
    ckpt = work / "dense_lenet300" / "model.pt"
    if not ckpt.exists():
        ckpt = pretrained(work, "lenet300", data, epochs)
    for sparsity in (0.5, 0.9):
        obs = pruned(work, "lenet300", data, ckpt, "obs", sparsity, "criterion.scope=layer",
                     f"criterion.samples={samples}")
        gpt = pruned(work, "lenet300", data, ckpt, "sparsegpt", sparsity)
        print(f"   {sparsity:.0%}: OBS {obs['score_seconds']:.2f} s, acc {obs['test_acc_pruned']:.4f}; SparseGPT "
              f"{gpt['score_seconds']:.2f} s, acc {gpt['test_acc_pruned']:.4f}; time ratio SparseGPT/OBS "
              f"{gpt['score_seconds'] / obs['score_seconds']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5", "vit_tiny"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small widths, synthetic data, 1 epoch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = ["dataset=synthetic"] if args.quick else ["dataset=fashion_mnist"]
    widths, epochs = ([128, 256] if args.quick else args.widths), (1 if args.quick else args.epochs)
    print(f"torch {torch.__version__}, {args.threads} threads, data: {data[0]}")
    t0 = time.perf_counter()
    widths_table(widths, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        networks_table(Path(tmp), data, args.models, epochs)
        obs_table(Path(tmp), data, epochs, 128 if args.quick else 1024)
    print(f"({time.perf_counter() - t0:.0f} s; peak resident set of this process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")


if __name__ == "__main__":
    main()
