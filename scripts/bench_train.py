"""Training-speed benchmark, everything measured in one process.

1. Mask enforcement, per model: epochs of
     masked      prunebench's fit() with 90%-sparse magnitude masks
     dense       prunebench's fit() without masks (deterministic=false, tf32=true: the run's defaults)
     deterministic  the same with deterministic=true
     bare        a minimal PyTorch loop over the same in-memory tensors (the floor)
     torch_prune the masked training done with torch.nn.utils.prune (mask applied in every forward)
   Targets: masked / dense <= 1.03, dense / bare <= 1.10.
2. The data path, for CIFAR-shaped data (--data cifar_shaped, 50,000 images by default):
   prunebench's in-memory tensors with batched on-device augmentation (random crop with
   4-pixel padding, horizontal flip) against a torchvision DataLoader + transforms doing the
   same work per sample, both alone (data only) and feeding the same training step.
   Target: prunebench >= 5x faster for in-memory data.

Variants run one epoch each per repeat in a rotating order, so machine noise hits them alike;
a ratio is the median over repeats of the ratio within a repeat.

    .venv/bin/python scripts/bench_train.py                                   # LeNet-300-100, Fashion-MNIST
    .venv/bin/python scripts/bench_train.py --model lenet5 resnet20 --data cifar_shaped --images 10000
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from prunebench.config import TrainConfig
from prunebench.criteria import ScoreContext
from prunebench.criteria.magnitude import Magnitude
from prunebench.data import Augment, TensorData, build_dataset
from prunebench.core.device import configure_backends, resolve_device
from prunebench.core.masks import Masks
from prunebench.models import build_model, default_config
from prunebench.config.options import FashionMNISTConfig, SyntheticConfig
from prunebench.core.select import select_by_rank
from prunebench.training.loop import fit

# (mean, std) per channel of CIFAR-10, to normalise the CIFAR-shaped images like the real ones
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_rounds(steps: Dict[str, Callable[[], None]], repeats: int, device) -> Dict[str, List[float]]:
    names = list(steps)
    for step in steps.values():  # warm-up
        step()
    times = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            steps[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def ratio(times, a, b) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def report(times, lines):
    for name, ts in times.items():
        print(f"  {name:<14} {statistics.median(ts):8.3f} s/epoch (median; min {min(ts):.3f}, max {max(ts):.3f})")
    for label, a, b, target in lines:
        print(f"  {label:<34} {ratio(times, a, b):6.3f}   {target}")


def recipe(model_name: str) -> TrainConfig:
    if model_name.startswith("lenet"):
        return TrainConfig(optimizer="adam", lr=1.2e-3, batch_size=60)
    return TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=128)


def new_model(name, data, device, seed=0):
    torch.manual_seed(seed)
    return build_model(default_config(name), data.input_shape, data.num_classes).to(device)


def magnitude_masks(model, sparsity=0.9):
    masks = Masks.ones(model)
    scores = Magnitude(None).score(ScoreContext(model, masks))
    return select_by_rank(scores, masks, sparsity)


def bare_epoch(model, data, opt, cfg, gen):
    """The floor: shuffled index slices, forward, backward, step. Nothing else."""
    model.train()
    for x, y in data.train_batches(cfg.batch_size, gen):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def bench_masking(model_name, data, device, repeats):
    cfg = recipe(model_name)
    models = {name: new_model(model_name, data, device)
              for name in ("masked", "dense", "bare", "torch_prune", "deterministic")}
    masks = magnitude_masks(models["masked"])
    masks.apply(models["masked"])
    masks.to_torch_prune(models["torch_prune"])
    # the floor uses the same fused optimizer prunebench does
    opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD
    extra = {} if cfg.optimizer == "adam" else {"momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
    bare_opt = opt_cls(models["bare"].parameters(), lr=cfg.lr, fused=True, **extra)
    gens = {name: torch.Generator().manual_seed(0) for name in models}

    def prunebench_epoch(name, m):
        return lambda: fit(models[name], data, cfg, epochs=1, lr=cfg.lr, generator=gens[name], masks=m)

    def deterministic_epoch():  # deterministic=true (the others run as deterministic=false)
        configure_backends(deterministic=True, tf32=True)
        try:
            prunebench_epoch("deterministic", None)()
        finally:
            configure_backends(deterministic=False, tf32=True)

    configure_backends(deterministic=False, tf32=True)  # the run's defaults
    steps = {
        "masked": prunebench_epoch("masked", masks),
        "dense": prunebench_epoch("dense", None),
        "bare": lambda: bare_epoch(models["bare"], data, bare_opt, cfg, gens["bare"]),
        "torch_prune": prunebench_epoch("torch_prune", None),
        "deterministic": deterministic_epoch,
    }
    print(f"\n{model_name} on {data.name} ({data.num_examples('train')} examples, batch {cfg.batch_size}, "
          f"{cfg.optimizer}), masks at 90% sparsity, {repeats} epochs per variant")
    times = timed_rounds(steps, repeats, device)
    report(times, [("masked / dense", "masked", "dense", "(target <= 1.03)"),
                   ("dense / bare loop", "dense", "bare", "(target <= 1.10)"),
                   ("torch.nn.utils.prune / masked", "torch_prune", "masked", ""),
                   ("deterministic=true / dense", "deterministic", "dense", "(GPU: the cost of determinism)")])


def torchvision_loader(images_u8, labels, batch_size, workers, seed):
    """The usual pipeline: a Dataset of uint8 images, per-sample transforms, a DataLoader."""
    from torchvision.transforms import v2

    transform = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR_MEAN, CIFAR_STD)])

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return transform(images_u8[i]), labels[i]

    return torch.utils.data.DataLoader(Images(), batch_size=batch_size, shuffle=True, num_workers=workers,
                                       generator=torch.Generator().manual_seed(seed),
                                       persistent_workers=workers > 0)


def bench_data_path(model_name, n_images, device, repeats, workers):
    g = torch.Generator().manual_seed(0)
    images_u8 = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n_images,), generator=g)
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    x = (images_u8.float() / 255 - mean) / std
    data = TensorData("cifar_shaped", x, labels, x[:1000], labels[:1000], 10,
                      pixel_zero=(-mean / std).flatten(), augment=Augment(padding=4, flip=True)).to(device)
    cfg = recipe(model_name)
    loader = torchvision_loader(images_u8, labels, cfg.batch_size, workers, seed=0)
    gen = torch.Generator().manual_seed(0)

    def prunebench_data():
        for xb, yb in data.train_batches(cfg.batch_size, gen):
            pass
        sync(device)

    def torchvision_data():
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        sync(device)

    print(f"\nCIFAR-shaped data path, {n_images} images, batch {cfg.batch_size}, DataLoader with {workers} "
          f"workers, {repeats} epochs per variant")
    times = timed_rounds({"prunebench": prunebench_data, "torchvision": torchvision_data}, repeats, device)
    report(times, [("data only: torchvision / prunebench", "torchvision", "prunebench", "(target >= 5)")])

    model_pb, model_tv = new_model(model_name, data, device), new_model(model_name, data, device)
    opt_pb = torch.optim.SGD(model_pb.parameters(), lr=0.01, momentum=0.9, fused=True)
    opt_tv = torch.optim.SGD(model_tv.parameters(), lr=0.01, momentum=0.9, fused=True)

    def train_on(model, opt, batches):
        model.train()
        for xb, yb in batches:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    steps = {"prunebench": lambda: train_on(model_pb, opt_pb, data.train_batches(cfg.batch_size, gen)),
             "torchvision": lambda: train_on(model_tv, opt_tv, loader)}
    print(f"  ... feeding {model_name} training:")
    times = timed_rounds(steps, max(1, repeats // 2), device)
    report(times, [(f"{model_name} epoch: torchvision / prunebench", "torchvision", "prunebench", "")])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["lenet300"], help="models to time (registry names)")
    parser.add_argument("--data", default="fashion_mnist", choices=["fashion_mnist", "cifar_shaped"])
    parser.add_argument("--images", type=int, default=50_000, help="cifar_shaped: number of training images")
    parser.add_argument("--repeats", type=int, default=8, help="epochs per variant")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the torchvision baseline")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.data == "fashion_mnist":
        data = build_dataset(FashionMNISTConfig(name="fashion_mnist"), args.data_dir).to(device)
    else:
        data = build_dataset(SyntheticConfig(name="synthetic", num_train=args.images, num_test=1000,
                                             shape=[3, 32, 32], augment=True), "").to(device)
    for model_name in args.model:
        bench_masking(model_name, data, device, args.repeats)
    if args.data == "cifar_shaped":
        for model_name in args.model:
            bench_data_path(model_name, args.images, device, args.repeats, args.workers)


if __name__ == "__main__":
    main()
