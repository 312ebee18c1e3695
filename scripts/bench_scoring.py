"""Score + select against a bare implementation of the same formula, and in training steps.

For each model (LeNet-300-100, LeNet-5, VGG-16 CIFAR-shaped) and criterion (magnitude, random,
SNIP, GraSP, SynFlow) at 90% global sparsity: prunebench's `criterion.prune` (what a run calls)
against the formula written here in plain torch, the way the authors' reference code of the
SynFlow paper does it (score, one global k-th value, keep what is above it; SynFlow's 100
rescoring iterations on a float64 |θ| copy). And selection alone: prunebench's ranking of given
scores against the bare k-th value threshold, and structured (filter) group selection on VGG-16.
Every cost is also given in training steps of that model (forward, backward, SGD step at its
recipe's batch size), measured in the same run.

prunebench's masks also break ties by position and keep exact counts, which the bare threshold
does not; tests/test_select.py pins the masks. Times are medians of --repeats, interleaved.

    python scripts/bench_scoring.py [--repeats 7] [--models lenet300,lenet5,vgg16]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from prunebench import Masks, ScoreContext, compose, get_criterion
from prunebench.config import GranularityConfig
from prunebench.core.granularity import build_granularity
from prunebench.models import build_model, default_config
from prunebench.training.loop import make_optimizer

SPARSITY = 0.9


# ------------------------------------------------------------------------- bare formulas
def bare_select(scores):
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    k = int(SPARSITY * flat.numel())
    threshold = torch.kthvalue(flat, k).values
    return {n: (s > threshold).float() for n, s in scores.items()}


def weights(model):
    return {n: p for n, p in model.named_parameters() if p.dim() > 1}


def bare_magnitude(model, batch, gen):
    return bare_select({n: p.detach().abs() for n, p in weights(model).items()})


def bare_random(model, batch, gen):
    return bare_select({n: torch.rand(p.shape, generator=gen) for n, p in weights(model).items()})


def bare_snip(model, batch, gen):
    x, y = batch
    model.eval()
    w = weights(model)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(w.values()))
    return bare_select({n: (p.detach() * g).abs() for (n, p), g in zip(w.items(), grads)})


def bare_grasp(model, batch, gen):
    x, y = batch
    net = copy.deepcopy(model).train()
    w = list(weights(net).values())
    half = x.shape[0] // 2
    parts = [(x[:half], y[:half]), (x[half:], y[half:])]
    g = [torch.zeros_like(p) for p in w]
    for xi, yi in parts:
        for a, gi in zip(g, torch.autograd.grad(F.cross_entropy(net(xi) / 200, yi), w)):
            a += gi
    z = 0
    for xi, yi in parts:
        gr = torch.autograd.grad(F.cross_entropy(net(xi) / 200, yi), w, create_graph=True)
        z = z + sum((a * b).sum() for a, b in zip(g, gr))
    hg = torch.autograd.grad(z, w)
    return bare_select({n: p.detach() * h for (n, p), h in zip(weights(net).items(), hg)})


def bare_synflow(model, batch, gen, iterations=100):
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for p in net.state_dict().values():
            if p.is_floating_point():
                p.abs_()
    w = weights(net)
    original = {n: p.detach().clone() for n, p in w.items()}
    masks = {n: torch.ones_like(p) for n, p in w.items()}
    x = torch.ones((1,) + batch[0].shape[1:], dtype=torch.float64)
    for k in range(1, iterations + 1):
        with torch.no_grad():
            for n, p in w.items():
                p.copy_(original[n] * masks[n])
        grads = torch.autograd.grad(net(x).sum(), list(w.values()))
        scores = {n: (p.detach() * g).abs() for (n, p), g in zip(w.items(), grads)}
        density = (1 - SPARSITY) ** (k / iterations)
        flat = torch.cat([s.reshape(-1) for s in scores.values()])
        threshold = torch.kthvalue(flat, int((1 - density) * flat.numel())).values
        masks = {n: (s > threshold).double() for n, s in scores.items()}
    return masks


BARE = {"magnitude": bare_magnitude, "random": bare_random, "snip": bare_snip, "grasp": bare_grasp,
        "synflow": bare_synflow}


# ------------------------------------------------------------------------------ prunebench
def context(model, batch, gen, num_classes):
    return ScoreContext(model, Masks.ones(model), batches=lambda: iter([batch]), generator=gen,
                        input_shape=tuple(batch[0].shape[1:]), num_classes=num_classes)


def ours(name):
    options = {"samples_per_class": 5} if name == "grasp" else {}
    criterion = get_criterion(name, **options)

    def prune(model, batch, gen):
        return criterion.prune(context(model, batch, gen, 10), SPARSITY)
    return prune


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def training_step_seconds(model_name, shape, repeats) -> float:
    cfg = compose(f"model={model_name}")
    torch.manual_seed(0)
    model = build_model(cfg.model, shape, 10)
    opt = make_optimizer(model, cfg.train, cfg.train.lr)
    x, y = torch.randn((cfg.train.batch_size,) + shape), torch.arange(cfg.train.batch_size) % 10

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step()
    return statistics.median(timed(step) for _ in range(repeats * 5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--models", default="lenet300,lenet5,vgg16")
    parser.add_argument("--criteria", default="magnitude,random,snip,grasp,synflow")
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} threads; median of {args.repeats}; ratio = prunebench / bare")
    for model_name in args.models.split(","):
        shape = (1, 28, 28) if model_name.startswith("lenet") else (3, 32, 32)
        torch.manual_seed(0)
        model = build_model(default_config(model_name), shape, 10)
        gen = torch.Generator().manual_seed(0)
        batch = (torch.randn((100,) + shape, generator=gen), torch.arange(100) % 10)
        rows = {f"{name} score+select": (ours(name), BARE[name]) for name in args.criteria.split(",")}
        scores = {n: p.detach().abs() for n, p in weights(model).items()}
        masks = Masks.ones(model)
        magnitude = get_criterion("magnitude")
        rows["select only (global)"] = (lambda m, b, g: magnitude.rank(scores, masks, SPARSITY),
                                        lambda m, b, g: bare_select(scores))
        times = {row: ([], []) for row in rows}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for row, (mine, bare) in rows.items():
                a = timed(mine, model, batch, torch.Generator().manual_seed(repeat))
                b = timed(bare, model, batch, torch.Generator().manual_seed(repeat))
                if repeat:
                    times[row][0].append(a)
                    times[row][1].append(b)
        step = training_step_seconds(model_name, shape, args.repeats)
        print(f"\n{model_name} ({sum(p.numel() for p in weights(model).values()):,} weights; "
              f"one training step {1e3 * step:.2f} ms)")
        for row, (a, b) in times.items():
            ratio = statistics.median(x / y for x, y in zip(a, b))
            print(f"  {row:<22} prunebench {1e3 * statistics.median(a):9.2f} ms = {statistics.median(a) / step:7.2f} "
                  f"steps   bare {1e3 * statistics.median(b):9.2f} ms   ratio {ratio:5.2f}")
        if model_name.startswith(("vgg", "lenet5", "resnet")):
            filters = build_granularity(GranularityConfig(name="filter", reduce="l1"))
            filters.bind(model, shape)
            t = statistics.median(timed(magnitude.rank, scores, masks, 0.5, filters) for _ in range(args.repeats))
            print(f"  {'filter selection, 50%':<22} prunebench {1e3 * t:9.2f} ms = {t / step:7.2f} steps")


if __name__ == "__main__":
    main()
