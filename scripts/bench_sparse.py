"""Does sparsity run faster? Dense against CSR kernels (prunebench/core/csr.py), measured here.

1. Per layer type and shape (LeNet-300-100's Linear layers, VGG-16's convolutions at CIFAR size):
   forward latency dense and sparse from 50% to 99% sparsity (random masks), at batch 1 and 128,
   and the crossover: the lowest measured sparsity from which sparse is faster.
2. Whole networks (LeNet-300-100, VGG-16 CIFAR-shaped) pruned by global magnitude to 90/95/98%:
   the forward latency run dense against the same network with CSR layers where each pays
   (sparse.sparsify decides per layer, at that batch size), and the speedup.
3. Training, one Linear layer: a dense forward+backward (what masked training does) against a
   CSR forward+backward (gradient of the input and of the nonzero weights only).

All in fp32 on the CPU (or --device cuda), medians of --repeats, dense and sparse interleaved.

    python scripts/bench_sparse.py [--repeats 20] [--threads N]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from prunebench import Masks, select_by_rank
from prunebench.models import build_model, default_config
from prunebench.core.csr import median_ms, sparse_latency, sparse_version

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
LAYERS = {  # name: (layer, input shape of one example)
    "Linear 784->300": (lambda: nn.Linear(784, 300), (784,)),
    "Linear 300->100": (lambda: nn.Linear(300, 100), (300,)),
    "Conv 64->64 3x3 @32x32": (lambda: nn.Conv2d(64, 64, 3, padding=1), (64, 32, 32)),
    "Conv 128->128 3x3 @16x16": (lambda: nn.Conv2d(128, 128, 3, padding=1), (128, 16, 16)),
    "Conv 256->256 3x3 @8x8": (lambda: nn.Conv2d(256, 256, 3, padding=1), (256, 8, 8)),
    "Conv 512->512 3x3 @4x4": (lambda: nn.Conv2d(512, 512, 3, padding=1), (512, 4, 4)),
}


def random_prune(layer: nn.Module, sparsity: float) -> nn.Module:
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        layer.weight.mul_((torch.rand(layer.weight.shape, generator=g) >= sparsity).to(layer.weight))
    return layer


@torch.no_grad()
def layers_table(device, batch_sizes, repeats) -> None:
    print("1. layers: dense ms / sparse ms (ratio dense/sparse)")
    for name, (make, shape) in LAYERS.items():
        for b in batch_sizes:
            x = torch.randn((b,) + shape, device=device)
            cells, crossover = [], None
            for s in SPARSITIES:
                layer = random_prune(make(), s).to(device).eval()
                sparse = sparse_version(layer)
                dense_ms = median_ms(lambda: layer(x), repeats, 2, device)
                sparse_ms = median_ms(lambda: sparse(x), repeats, 2, device)
                cells.append(f"{s:.2f}: {dense_ms:7.3f}/{sparse_ms:7.3f} ({dense_ms / sparse_ms:5.2f})")
                if crossover is None and sparse_ms < dense_ms:
                    crossover = s
            print(f"  {name:<26} batch {b:<4} crossover {crossover if crossover is not None else 'none'}")
            for c in cells:
                print(f"      {c}")


def networks_table(device, batch_sizes, repeats) -> None:
    print("2. networks pruned by global magnitude: dense ms -> with sparse layers ms (speedup)")
    for name, shape in (("lenet300", (1, 28, 28)), ("vgg16", (3, 32, 32))):
        for sparsity in (0.9, 0.95, 0.98):
            torch.manual_seed(0)
            model = build_model(default_config(name), shape, 10).to(device).eval()
            masks = Masks.ones(model)
            params = dict(model.named_parameters())
            masks = select_by_rank({n: params[n].detach().abs() for n in masks}, masks, sparsity)
            masks.apply(model)
            result = sparse_latency(model, shape, batch_sizes, repeats, 2)
            cells = [f"batch {k[6:]}: {v['dense_ms']:.2f} -> {v['sparse_ms']:.2f} ms ({v['speedup']:.2f}x, "
                     f"{len(v['sparse_layers'])} sparse layers)" for k, v in result.items()]
            print(f"  {name:<9} {sparsity:.2f}  " + "   ".join(cells))


def training_table(device, repeats) -> None:
    print("3. training one Linear 784->300, batch 128: dense fwd+bwd vs CSR fwd+bwd (ms)")
    x = torch.randn(128, 784, device=device)
    for sparsity in (0.9, 0.98, 0.99):
        layer = random_prune(nn.Linear(784, 300), sparsity).to(device)
        w = layer.weight.detach().clone().requires_grad_(True)
        csr = layer.weight.detach().to_sparse_csr().requires_grad_(True)

        def dense_step():
            out = F.linear(x, w)
            out.sum().backward()

        def sparse_step():
            out = torch.sparse.mm(csr, x.t()).t()
            out.sum().backward()
        try:
            sparse_step()
        except (RuntimeError, NotImplementedError) as e:
            why = str(e).splitlines()[0]
            print(f"  {sparsity:.2f}: CSR backward is not available here ({type(e).__name__}: {why})")
            continue
        dense_ms = median_ms(dense_step, repeats, 2, device)
        sparse_ms = median_ms(sparse_step, repeats, 2, device)
        print(f"  {sparsity:.2f}: dense {dense_ms:.3f}  sparse {sparse_ms:.3f}  "
              f"ratio dense/sparse {dense_ms / sparse_ms:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 128])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.repeats}")
    layers_table(device, args.batch_sizes, args.repeats)
    networks_table(device, args.batch_sizes, args.repeats)
    training_table(device, args.repeats)


if __name__ == "__main__":
    main()
