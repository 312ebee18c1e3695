"""OBS cost: time and peak memory of the block-diagonal inverse Fisher (and the pruning step)
against parameter count and block size. Each configuration runs in its own process, so its
peak resident memory (ru_maxrss) is its own; baseline = the same process before OBS runs.

    .venv/bin/python scripts/bench_obs.py [--samples 1024] [--blocks 32 64 128 256] [--hidden 100 300 600 1200]

The issue's target: LeNet-300-100 (266,200 weights), 1,024 gradients, block 128 in under 60 s
on 2 CPU cores, and cost linear in the parameters at a fixed block size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(hidden: int, block: int, samples: int) -> dict:
    import torch

    from prunebench import Masks, ScoreContext, get_criterion
    from prunebench.data import build_dataset
    from prunebench.models.lenet import LeNet300
    from prunebench.config.options import SyntheticConfig

    data = build_dataset(SyntheticConfig(name="synthetic", num_train=samples, num_test=10), "")
    torch.manual_seed(0)
    model = LeNet300(data.input_shape, 10, hidden=(hidden, max(1, hidden // 3)))
    masks = Masks.ones(model)
    crit = get_criterion("obs", block_size=block, samples=samples)
    ctx = ScoreContext(model, masks, batches=lambda: data.train_batches(60, torch.Generator().manual_seed(0)),
                       generator=torch.Generator().manual_seed(0))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    scores = crit.score(ctx)
    t1 = time.perf_counter()
    new = crit.select(scores, ctx, 0.9)
    crit.compensate(model, new, ctx)
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"weights": masks.numel(), "block": block, "samples": samples, "inverse_s": t1 - t0,
            "prune_s": t2 - t1, "peak_mb": peak / 1024, "extra_mb": (peak - base_rss) / 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--hidden", type=int, nargs="+", default=[100, 300, 600])
    parser.add_argument("--single", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(one(*args.single)))
        return
    rows = []
    configs = [(h, 128) for h in args.hidden] + [(300, b) for b in args.blocks if b != 128]
    for hidden, block in configs:
        out = subprocess.run([sys.executable, __file__, "--single", str(hidden), str(block), str(args.samples)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"  {r['weights']:>9,} weights  block {r['block']:>4}  {r['samples']} gradients: inverse "
              f"{r['inverse_s']:6.2f} s, prune+update {r['prune_s']:5.2f} s, peak {r['peak_mb']:7.0f} MB "
              f"(+{r['extra_mb']:.0f} MB for OBS)", flush=True)
    at128 = sorted((r for r in rows if r["block"] == 128), key=lambda r: r["weights"])
    if len(at128) > 1:
        a, b = at128[0], at128[-1]
        print(f"block 128: {b['weights'] / a['weights']:.1f}x the weights -> {b['inverse_s'] / a['inverse_s']:.1f}x "
              f"the time, {b['extra_mb'] / max(a['extra_mb'], 1):.1f}x the extra memory")


if __name__ == "__main__":
    main()
