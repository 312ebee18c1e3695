"""Training-speed benchmark: LeNet-300-100 on Fashion-MNIST, epochs timed in one process.

Variants, one epoch each per repeat in a rotating order, so machine noise hits them alike;
ratios are the median over repeats of the ratio within a repeat:
  masked      prunebench's fit() with 90%-sparse masks (gradient and weight multiply per step)
  dense       prunebench's fit() without masks
  bare        a minimal PyTorch loop over the same in-memory tensors (the floor)
  torch_prune the masked training done with torch.nn.utils.prune (mask applied in every forward)

Prints the median seconds per epoch and the ratios masked/dense (target <= 1.03) and
dense/bare (target <= 1.10).

    .venv/bin/python scripts/bench_train.py [--repeats 8] [--threads N] [--device auto] [--data synthetic]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from prunebench.config import TrainConfig
from prunebench.criteria import ScoreContext
from prunebench.criteria.magnitude import Magnitude
from prunebench.data import build_dataset
from prunebench.data.fashion_mnist import FashionMNISTConfig
from prunebench.data.synthetic import SyntheticConfig
from prunebench.masks import Masks
from prunebench.models.lenet import LeNet300
from prunebench.pipeline import resolve_device
from prunebench.select import select_by_rank
from prunebench.train import fit

CFG = TrainConfig(optimizer="adam", lr=1.2e-3, batch_size=60)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def new_model(data, device, seed=0):
    torch.manual_seed(seed)
    return LeNet300(data.input_shape, data.num_classes).to(device)


def magnitude_masks(model, sparsity=0.9):
    masks = Masks.ones(model)
    scores = Magnitude(None).score(ScoreContext(model, masks))
    return select_by_rank(scores, masks, sparsity)


def epoch_prunebench(model, data, masks, gen):
    fit(model, data, CFG, epochs=1, lr=CFG.lr, generator=gen, masks=masks)


def epoch_bare(model, data, opt, gen):
    model.train()
    n = data.x_train.shape[0]
    order = torch.randperm(n, generator=gen).to(data.x_train.device)
    for start in range(0, n, CFG.batch_size):
        idx = order[start:start + CFG.batch_size]
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=8, help="epochs per variant")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", default="fashion_mnist", choices=["fashion_mnist", "synthetic"])
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.data == "fashion_mnist":
        data = build_dataset(FashionMNISTConfig(name="fashion_mnist"), args.data_dir)
    else:
        data = build_dataset(SyntheticConfig(name="synthetic", num_train=60000, num_test=1000), "")
    data = data.to(device)

    models = {name: new_model(data, device) for name in ("masked", "dense", "bare", "torch_prune")}
    masks = magnitude_masks(models["masked"])
    masks.apply(models["masked"])
    masks.to_torch_prune(models["torch_prune"])
    # the floor: the same fused Adam prunebench uses, no masks, no bookkeeping
    bare_opt = torch.optim.Adam(models["bare"].parameters(), lr=CFG.lr, fused=True)
    gens = {name: torch.Generator().manual_seed(0) for name in models}

    steps = {
        "masked": lambda: epoch_prunebench(models["masked"], data, masks, gens["masked"]),
        "dense": lambda: epoch_prunebench(models["dense"], data, None, gens["dense"]),
        "bare": lambda: epoch_bare(models["bare"], data, bare_opt, gens["bare"]),
        "torch_prune": lambda: epoch_prunebench(models["torch_prune"], data, None, gens["torch_prune"]),
    }
    for step in steps.values():  # warm-up
        step()
    names = list(steps)
    times = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            steps[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)

    med = {name: statistics.median(ts) for name, ts in times.items()}

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    print(f"LeNet-300-100 on {data.name} ({data.x_train.shape[0]} examples, batch {CFG.batch_size}), "
          f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{len(times['dense'])} epochs per variant")
    for name, t in med.items():
        print(f"  {name:<12} {t:7.3f} s/epoch (median; min {min(times[name]):.3f}, max {max(times[name]):.3f})")
    print(f"  masked / dense                 {ratio('masked', 'dense'):.3f}   (target <= 1.03)")
    print(f"  dense / bare loop              {ratio('dense', 'bare'):.3f}   (target <= 1.10)")
    print(f"  torch.nn.utils.prune / masked  {ratio('torch_prune', 'masked'):.3f}")
    sparsity = 1 - sum(int(p.count_nonzero()) for n, p in models["masked"].named_parameters() if n in masks.names()) / masks.numel()
    print(f"  masked model sparsity after training: {sparsity:.4f}")


if __name__ == "__main__":
    main()
