"""Scoring cost of each criterion, as a multiple of one training step, measured in one process.

For each model: the median time of one training step (forward, backward, optimizer step at
the model's batch size, on Fashion-MNIST), then the median time of each criterion's full
pruning decision at 90% sparsity on the freshly initialised network (scores plus selection;
SynFlow's 100 rescoring iterations included).

    .venv/bin/python scripts/bench_scoring.py [--models lenet300 lenet5] [--repeats 5] [--dataset synthetic]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import prunebench
from prunebench import Masks, ScoreContext
from prunebench.criteria import build_criterion
from prunebench.data import build_dataset
from prunebench.device import resolve_device
from prunebench.models import build_model
from prunebench.train import make_optimizer

CRITERIA = ["magnitude", "random", "snip", "grasp", "synflow"]


def median_seconds(fn, repeats, device):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5"])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    for model_name in args.models:
        cfg = prunebench.compose(f"model={model_name}", f"dataset={args.dataset}")
        data = build_dataset(cfg.dataset, cfg.data_dir).to(device)
        torch.manual_seed(0)
        model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
        opt = make_optimizer(model, cfg.train, cfg.train.lr)
        batches = data.train_batches(cfg.train.batch_size, torch.Generator().manual_seed(0))

        def train_step():
            x, y = next(batches)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step = median_seconds(train_step, args.repeats * 20, device)
        print(f"\n{model_name} on {data.name}: one training step (batch {cfg.train.batch_size}) {step * 1e3:.2f} ms")
        for name in CRITERIA:
            crit_cfg = prunebench.compose(f"model={model_name}", f"criterion={name}").criterion
            criterion = build_criterion(crit_cfg)
            gen = torch.Generator().manual_seed(0)

            def prune():
                ctx = ScoreContext(model, Masks.ones(model), generator=gen, input_shape=data.input_shape,
                                   num_classes=data.num_classes,
                                   batches=lambda: data.train_batches(cfg.train.batch_size, gen))
                criterion.prune(ctx, 0.9)

            seconds = median_seconds(prune, args.repeats, device)
            print(f"  {name:<10} {seconds * 1e3:9.1f} ms = {seconds / step:8.1f} training steps")


if __name__ == "__main__":
    main()
