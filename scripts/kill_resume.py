"""Kill runs at chosen points, resume them, and compare with the same run never interrupted.

Each case starts `prunebench ARGS hydra.run.dir=...`, sends a signal once metrics.jsonl shows a
given event (optionally after a delay, to land inside an epoch), checks the run left no
summary.json, reruns the same command (which resumes from checkpoint.pt), and compares the
result with an uninterrupted run of the same command: summary.json without wall-clock fields,
model.pt and masks.pt bit for bit, and every epoch's training loss. Prints a markdown table.

    .venv/bin/python scripts/kill_resume.py            # LeNet-300-100 and LeNet-5 on Fashion-MNIST
    .venv/bin/python scripts/kill_resume.py --quick    # synthetic data (a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from prunebench.runs import checkpoint

EXE = str(Path(sys.executable).with_name("prunebench"))


def events(run_dir: Path):
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:  # being written
            pass
    return out


def launch(args, run_dir: Path, sig=None, when=None, delay=0.0) -> int:
    proc = subprocess.Popen([EXE, *args, f"hydra.run.dir={run_dir}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    if sig is not None:
        while proc.poll() is None and not any(when(e) for e in events(run_dir)):
            time.sleep(0.002)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(sig)
    return proc.wait()


def numbers(run_dir: Path):
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items()
                    if not any(t in k for t in ("seconds", "latency", "speedup")) and k != "checkpoint"}
        return [strip(v) for v in obj] if isinstance(obj, list) else obj
    return strip(json.loads((run_dir / "summary.json").read_text()))


def same_tensors(a: Path, b: Path, name: str) -> bool:
    x, y = (torch.load(d / name, weights_only=True) for d in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def losses(run_dir: Path):
    return [(e["phase"], e["round"], e["epoch"], e["train_loss"]) for e in events(run_dir) if e["event"] == "epoch"]


def where(e, text):
    return e["event"] == "checkpoint" and e["where"] == text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="synthetic data instead of Fashion-MNIST")
    args = parser.parse_args()
    data = (["dataset=synthetic", "dataset.num_train=16384"] if args.quick else ["dataset=fashion_mnist"])
    lenet300 = [*data, "model=lenet300", "schedule=iterative", "schedule.rounds=3", "sparsity=0.9",
                "train.pretrain_epochs=3", "train.finetune_epochs=2"]
    rewind = [*lenet300, "retrain=rewind", "retrain.rewind_epoch=1"]
    lenet5 = [*data, "model=lenet5", "granularity=filter", "criterion.scope=layer", "schedule=iterative",
              "schedule.rounds=2", "sparsity=0.5", "train.pretrain_epochs=1", "train.finetune_epochs=1",
              "latency.repeats=1"]
    if args.quick:
        lenet5 = [*lenet5, "train.pretrain_epochs=2", "train.finetune_epochs=2"]
    gradual = [*data, "schedule=gradual", "sparsity=0.9", "train.pretrain_epochs=4", "train.finetune_epochs=1",
               "schedule.start=1", "schedule.end=3", "schedule.every=0.25", "train.optimizer=sgd",
               "train.lr=0.05", "train.momentum=0.9"]
    rigl = [*data, "schedule=dynamic", "schedule.method=rigl", "sparsity=0.9", "train.pretrain_epochs=3",
            "train.finetune_epochs=1", "schedule.every=50"]
    ft5 = "round 2 finetune epoch 1" if args.quick else "pretrained"
    cases = [  # run, kill point, signal, trigger, delay (s) after it
        ("lenet300 magnitude 3 rounds", lenet300, "during pretraining", signal.SIGKILL,
         lambda e: where(e, "pretrain epoch 1"), 0.3),
        ("lenet300 magnitude 3 rounds", lenet300, "between rounds (round 1 recorded)", signal.SIGKILL,
         lambda e: e["event"] == "round" and e["round"] == 1, 0.0),
        ("lenet300 magnitude 3 rounds", lenet300, "during finetuning (round 2, epoch 2)", signal.SIGKILL,
         lambda e: where(e, "round 2 finetune epoch 1"), 0.3),
        ("lenet300 magnitude 3 rounds", lenet300, "mid-epoch, round 3 finetune", signal.SIGTERM,
         lambda e: where(e, "round 2"), 0.5),
        ("lenet300 magnitude 3 rounds", lenet300, "mid-epoch, pretraining (SLURM's warning)", signal.SIGUSR2,
         lambda e: where(e, "pretrain epoch 2"), 0.3),
        ("lenet300 rewind to epoch 1", rewind, "during finetuning (round 1, epoch 2)", signal.SIGKILL,
         lambda e: where(e, "round 1 finetune epoch 1"), 0.2),
        ("lenet5 L1 filters (compacted)", lenet5, "mid-epoch, finetuning the compacted net", signal.SIGTERM,
         lambda e: where(e, ft5), 3.0 if not args.quick else 0.2),
        ("lenet300 gradual magnitude", gradual, "between two pruning steps (after step 6)", signal.SIGKILL,
         lambda e: e["event"] == "round" and e["round"] == 6, 0.0),
        ("lenet300 gradual magnitude", gradual, "mid-epoch, between pruning steps", signal.SIGTERM,
         lambda e: e["event"] == "round" and e["round"] == 3, 0.05),
        ("lenet300 RigL", rigl, "between two mask updates (epoch 2)", signal.SIGKILL,
         lambda e: where(e, "dynamic epoch 1"), 0.0),
        ("lenet300 RigL", rigl, "mid-epoch, between mask updates", signal.SIGTERM,
         lambda e: e["event"] == "mask_update" and e["step"] >= 500, 0.02),
    ]
    print("| run | killed | signal | resumed from | summary | weights, masks | epoch losses | exit |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir="outputs") as tmp:
        references = {}
        for i, (name, run_args, point, sig, when, delay) in enumerate(cases):
            if name not in references:
                references[name] = Path(tmp) / f"ref{len(references)}"
                assert launch(run_args, references[name]) == 0, f"{name}: the uninterrupted run failed"
            ref, run_dir = references[name], Path(tmp) / f"case{i}"
            code = launch(run_args, run_dir, sig, when, delay)
            assert not (run_dir / "summary.json").exists(), f"{name}: {point}: the run finished before the signal"
            resumed_from = checkpoint.load(run_dir / checkpoint.FILE)["where"]
            assert launch(run_args, run_dir) == 0, f"{name}: {point}: the resumed run failed"
            yes = {True: "identical", False: "DIFFERENT"}
            print(f"| {name} | {point} | {signal.Signals(sig).name} | {resumed_from} | "
                  f"{yes[numbers(run_dir) == numbers(ref)]} | "
                  f"{yes[same_tensors(run_dir, ref, 'model.pt') and same_tensors(run_dir, ref, 'masks.pt')]} | "
                  f"{yes[losses(run_dir) == losses(ref)]} | {code} |", flush=True)


if __name__ == "__main__":
    os.makedirs("outputs", exist_ok=True)
    main()
