"""What checkpointing costs, as a fraction of a training epoch, measured in one process.

Per model: one training epoch with prunebench's fit() (masked, 90% sparse, the optimizer the
model's recipe uses) is the baseline; then the run's own checkpoint writer (RunCheckpoints.save:
model, masks, θ0, a rewind point, optimizer and LR schedule state, random state, records; digest,
fsync, rename) writes the checkpoint a mid-finetune save holds, `--writes` times, into a
directory on the same disk as outputs/. Reported: the checkpoint's size, the median write and
load (digest check + torch.load(weights_only=True)) times, and write / epoch, the cost of
checkpoint.every_epochs=1.

With --estimate-from B, an epoch is timed over its first B mini-batches and scaled to the whole
epoch (for the CIFAR-shaped models, whose epoch takes minutes on a CPU); the output says so.

    .venv/bin/python scripts/bench_checkpoint.py                          # Fashion-MNIST models
    .venv/bin/python scripts/bench_checkpoint.py --models resnet20 vgg16 --data cifar_shaped --estimate-from 20
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from prunebench.runs import checkpoint
from prunebench.runs.checkpoint import RunProgress, RunCheckpoints, StopSignals
from prunebench.config import TrainConfig
from prunebench.criteria import ScoreContext
from prunebench.criteria.magnitude import Magnitude
from prunebench.data import build_dataset
from prunebench.core.masks import Masks
from prunebench.models import build_model, default_config
from prunebench.config.options import FashionMNISTConfig, SyntheticConfig
from prunebench.runs.record import Recorder
from prunebench.retrain import snapshot
from prunebench.core.select import select_by_rank
from prunebench.training.loop import FitState, fit, make_lr_schedule, make_optimizer


def recipe(model: str) -> TrainConfig:
    """The model's training recipe from conf/train/<model>.yaml."""
    from prunebench import compose

    return compose(f"model={model}", "dataset=synthetic").train


class FirstBatches:
    """The first `n` mini-batches of each epoch of `data` (to time part of an epoch)."""

    def __init__(self, data, n):
        self.data, self.n = data, n

    def train_batches(self, batch_size, generator):
        for i, batch in enumerate(self.data.train_batches(batch_size, generator)):
            if i == self.n:
                return
            yield batch

    def num_examples(self, split):
        return self.data.num_examples(split)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5", "conv4"])
    parser.add_argument("--data", choices=["fashion_mnist", "cifar_shaped"], default="fashion_mnist")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--estimate-from", type=int, default=0, help="time this many batches and scale up")
    parser.add_argument("--writes", type=int, default=5)
    parser.add_argument("--dir", default="outputs", help="where the checkpoints are written (its disk)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.data == "fashion_mnist":
        data = build_dataset(FashionMNISTConfig(name="fashion_mnist"), args.data_dir)
    else:
        data = build_dataset(SyntheticConfig(name="synthetic", num_train=50_000, num_test=1000, shape=[3, 32, 32]),
                             args.data_dir)
    print(f"threads {torch.get_num_threads()}, {data.num_examples('train')} training examples, "
          f"checkpoints written under {Path(args.dir).resolve()}")
    print("| model | params | checkpoint MB | epoch s | write s (median) | load s | write / epoch |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        cfg = recipe(name)
        model = build_model(default_config(name), data.input_shape, data.num_classes)
        init = snapshot(model)
        masks = Masks.ones(model)
        masks = select_by_rank(Magnitude(None).score(ScoreContext(model, masks)), masks, 0.9)
        masks.apply(model)
        order = torch.Generator().manual_seed(0)
        batches = math.ceil(data.num_examples("train") / cfg.batch_size)
        timed = FirstBatches(data, args.estimate_from) if args.estimate_from else data
        start = time.perf_counter()
        fit(model, timed, cfg, 1, cfg.lr, order, masks=masks)
        epoch = (time.perf_counter() - start) * (batches / args.estimate_from if args.estimate_from else 1)

        # the state a mid-finetune checkpoint holds: optimizer state after a step, θ0 and a rewind point
        opt = make_optimizer(model, cfg, cfg.lr)
        schedule = make_lr_schedule(opt, cfg, 3)
        fit(model, FirstBatches(data, 1), cfg, 1, cfg.lr, order, masks=masks)
        x, y = next(data.train_batches(cfg.batch_size, order))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp, StopSignals() as stop:
            rec = Recorder(tmp, "bench")
            progress = RunProgress(model, masks, init, snapshot(model), rounds_done=1)
            writer = RunCheckpoints(Path(tmp), {"bench": name}, 1, rec, {"order": order}, stop,
                                    time.perf_counter(), "cpu")
            state = FitState(1, 0, opt.state_dict(), schedule.state_dict(), order.get_state(), None, 0.0)
            for _ in range(args.writes):
                writer.save("bench", progress, state, {"compact": None})
            loads = []
            for _ in range(args.writes):
                t0 = time.perf_counter()
                checkpoint.load(writer.path)
                loads.append(time.perf_counter() - t0)
            rec.close()
        write = statistics.median(w["seconds"] for w in writer.writes)
        size = writer.writes[0]["bytes"] / 2 ** 20
        params = sum(p.numel() for p in model.parameters())
        est = " (est.)" if args.estimate_from else ""
        print(f"| {name} | {params:,} | {size:.1f} | {epoch:.2f}{est} | {write:.4f} | {statistics.median(loads):.4f} "
              f"| {write / epoch:.4f} |")


if __name__ == "__main__":
    main()
