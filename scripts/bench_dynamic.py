"""What pruning inside training costs, measured in one process against dense training.

Epochs of prunebench's fit() on LeNet-300-100 (Fashion-MNIST when installed, else synthetic data
of its shape), variants in a rotating order so that machine noise hits them alike:
    dense      no masks
    static     a fixed 90% ERK mask (static sparse training)
    set, rigl  the same with a mask update every 100 steps (SET, RigL)
    gradual    gradual magnitude pruning, 4 pruning steps in the epoch (each with its two test
               evaluations and its record row, as a run does them)
and, alone, one RigL update (dense gradient of one batch, drop and grow in every layer) as a
fraction of a dense epoch.

    .venv/bin/python scripts/bench_dynamic.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import prunebench
from prunebench.runs.checkpoint import RunProgress
from prunebench.schedules.dynamic import DynamicSparse, initial_mask
from prunebench.schedules.gradual import GradualPruning
from prunebench.pipeline import build
from prunebench.runs.record import Recorder
from prunebench.retrain import snapshot
from prunebench.runs.state import RunState
from prunebench.training.loop import fit, steps_per_epoch


def run_state(overrides, out: Path) -> RunState:
    cfg = prunebench.compose(*overrides)
    exp = build(cfg)
    init = snapshot(exp.model)
    g = torch.Generator().manual_seed(0)
    return RunState(cfg, exp, Recorder(out), RunProgress(exp.model, exp.masks, init, init), None, None, g,
                    torch.Generator().manual_seed(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = [] if Path("/usr/share/datasets/fashion-mnist").exists() else ["dataset=synthetic",
                                                                          "dataset.shape=[1,28,28]",
                                                                          "dataset.num_train=60000"]
    out = Path(tempfile.mkdtemp())
    base = [*data, "train.eval_every_epoch=false", "train.pretrain_epochs=1", "sparsity=0.9"]
    runs = {name: run_state([*base, "schedule=dynamic", f"schedule.method={name}"], out / name)
            for name in ("static", "set", "rigl")}
    runs["dense"] = run_state(base, out / "dense")
    runs["gradual"] = run_state([*base, "schedule=gradual", "schedule.start=0.2", "schedule.end=1.0",
                                 "schedule.every=0.2"], out / "gradual")
    for name in ("static", "set", "rigl"):
        runs[name].progress.masks = initial_mask(runs[name])
    times = {name: [] for name in runs}
    names = list(runs)
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            run = runs[name]
            cfg = run.cfg.train
            if name == "gradual":  # each epoch prunes again from dense
                run.progress.masks, run.rec.rounds = run.exp.masks, []
            updates = {"set": lambda r: DynamicSparse(r, r.progress.masks, [0, 0]),
                       "rigl": lambda r: DynamicSparse(r, r.progress.masks, [0, 0]),
                       "gradual": lambda r: GradualPruning(r)}.get(name, lambda r: None)(run)
            t0 = time.perf_counter()
            fit(run.model, run.exp.data, cfg, 1, cfg.lr, run.data_order,
                masks=None if name == "dense" else run.progress.masks, hooks=[updates] if updates else [])
            if repeat:
                times[name].append(time.perf_counter() - t0)
    rigl = runs["rigl"]
    updater = DynamicSparse(rigl, rigl.progress.masks, [0, 0])
    batch = next(iter(rigl.exp.data.train_batches(rigl.cfg.train.batch_size, torch.Generator().manual_seed(2))))
    update_times = []
    for i in range(21):
        t0 = time.perf_counter()
        updater.update(100, rigl.model, batch)
        update_times.append(time.perf_counter() - t0)
    dense = statistics.median(times["dense"])
    print(f"LeNet-300-100, {runs['dense'].exp.data.name}, {runs['dense'].exp.data.num_examples('train')} examples, "
          f"batch {runs['dense'].cfg.train.batch_size}, {torch.get_num_threads()} threads, {args.repeats} epochs each")
    for name in names:
        med = statistics.median(times[name])
        ratio = statistics.median(t / d for t, d in zip(times[name], times["dense"]))
        print(f"  {name:<8} {med:7.3f} s/epoch   / dense {ratio:6.3f}")
    update = statistics.median(update_times[1:])
    steps, every = steps_per_epoch(rigl.exp.data, rigl.cfg.train.batch_size), rigl.cfg.schedule.every
    print(f"  one RigL update {update * 1000:.2f} ms = {update / dense:.5f} of a dense epoch; at one update "
          f"per {every} steps ({steps} steps per epoch): {update / dense * steps / every:.4f} of an epoch")


if __name__ == "__main__":
    main()
