"""What structured pruning buys at inference: size, FLOPs and CPU latency of the compacted network
against the dense one, measured in the same process, for each structured method and ratio.

    .venv/bin/python scripts/bench_structured.py                      # VGG-16 and ResNet-20, 3x32x32
    .venv/bin/python scripts/bench_structured.py --models resnet20 --ratios 0.5 --repeats 5
    .venv/bin/python scripts/bench_structured.py --models lenet5 conv4 --shape 1 28 28

No training happens (untrained networks, synthetic CIFAR-shaped data for the K-FAC factors):
accuracy is not the point here, compute is. Each method prunes the same freshly initialised
network through the pipeline's own `prune_step`, then Torch-Pruning compacts it; the compacted
network is checked to compute what the masked one does, then timed against the dense one,
the two alternately (one after the other drifted by up to 2x here).
"""

from __future__ import annotations

import argparse
import copy

import torch

from prunebench import compose
from prunebench.criteria import ScoreContext
from prunebench.core.metrics import count_macs
from prunebench.pipeline import build
from prunebench.schedules.steps import check_compact, prune_step
from prunebench.core.structure import compare_latency, count_params

METHODS = {  # name: overrides (Li et al. rank filters per layer; the K-FAC methods globally)
    "l1-filter": ["criterion=magnitude", "criterion.scope=layer"],
    "kron_obd": ["criterion=kron_obd", "criterion.samples=256"],
    "kron_obs": ["criterion=kron_obs", "criterion.samples=256"],
    "eigendamage": ["criterion=eigendamage", "criterion.samples=256"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet20"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.75])
    parser.add_argument("--repeats", type=int, default=10, help="timed forward passes (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--shape", nargs=3, type=int, default=[3, 32, 32], help="one input, C H W")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} CPU threads, median of {args.repeats} forward passes")
    print(f"{'model':9} {'method':12} {'ratio':>5} {'params':>11} {'MACs':>13} {'params÷':>8} {'MACs÷':>7} "
          f"{'b1 dense':>8} {'b1 ms':>8} {'b1 ×':>6} {'b128 dense':>9} {'b128 ms':>9} {'b128 ×':>7}")
    for model_name in args.models:
        for method in args.methods:
            for ratio in args.ratios:
                data_shape = f"dataset.shape=[{','.join(map(str, args.shape))}]"
                cfg = compose(f"model={model_name}", "dataset=synthetic", data_shape,
                              "dataset.num_train=512", "dataset.num_test=64", "granularity=filter",
                              f"sparsity={ratio}", "device=cpu", *METHODS[method])
                exp = build(cfg)
                shape = exp.data.input_shape
                dense = copy.deepcopy(exp.model).eval()
                gen = torch.Generator().manual_seed(0)
                ctx = ScoreContext(exp.model, exp.masks, generator=gen, input_shape=shape,
                                   num_classes=exp.data.num_classes,
                                   batches=lambda: exp.data.train_batches(64, gen))
                step = prune_step(exp, ctx, exp.targets[0])
                compact = exp.granularity.structure.compact(step.model, step.masks, shape)
                check_compact(compact, step.model, exp.data)
                params, macs = count_params(compact), count_macs(compact, shape).total
                # dense and compact timed alternately, so drift hits both alike
                t = compare_latency(dense, compact, shape, [1, 128], args.repeats)
                print(f"{model_name:9} {method:12} {ratio:>5.2f} {params:>11,} {macs:>13,} "
                      f"{count_params(dense) / params:>8.2f} {exp.macs.total / macs:>7.2f} "
                      f"{t['dense_latency_b1'] * 1e3:>8.2f} {t['compact_latency_b1'] * 1e3:>8.2f} "
                      f"{t['speedup_b1']:>6.2f} "
                      f"{t['dense_latency_b128'] * 1e3:>9.1f} {t['compact_latency_b128'] * 1e3:>9.1f} "
                      f"{t['speedup_b128']:>7.2f}", flush=True)

if __name__ == "__main__":
    main()
