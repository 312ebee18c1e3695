"""What DistributedDataParallel's gradient all-reduce costs per training step, as a fraction of the
step, measured inside one torchrun job (gloo on CPUs, NCCL on GPUs):

    torchrun --nproc_per_node=2 scripts/bench_ddp.py --model lenet300 --batch 128
    torchrun --nproc_per_node=1 scripts/bench_ddp.py --model resnet20      # the wrapper with one rank

Each rank times the same steps twice on its shard of the global batch: with DDP's all-reduce, and
inside `no_sync()` (the same forward and backward, no communication); the difference over the DDP
step is the communication's share. With one process it is the wrapper's own overhead.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from prunebench.core import distributed
from prunebench.models import build_model, default_config

SHAPES = {"lenet300": ((1, 28, 28), 10), "lenet5": ((1, 28, 28), 10), "resnet20": ((3, 32, 32), 10),
          "vgg16": ((3, 32, 32), 10)}


def timed_steps(net, opt, x, y, steps: int, sync: bool) -> float:
    def step():
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm up
        step() if sync else _no_sync(net, step)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    distributed.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        step() if sync else _no_sync(net, step)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def _no_sync(net, step):
    with net.no_sync():
        step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(SHAPES), default="lenet300")
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    w = distributed.init()
    if not torch.distributed.is_initialized():  # one rank: torchrun's WORLD_SIZE=1, the group all the same
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    shape, classes = SHAPES[args.model]
    torch.manual_seed(0)
    model = build_model(default_config(args.model), shape, classes).to(device)
    net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch // w.size, *shape, device=device)
    y = torch.randint(0, classes, (args.batch // w.size,), device=device)
    with_comm = timed_steps(net, opt, x, y, args.steps, sync=True)
    without = timed_steps(net, opt, x, y, args.steps, sync=False)
    if w.main:
        params = sum(p.numel() for p in model.parameters())
        print(f"{args.model} ({params:,} parameters), {w.size} rank(s), {device.type}, global batch {args.batch}: "
              f"step {with_comm * 1e3:.2f} ms with DDP's all-reduce, {without * 1e3:.2f} ms without; "
              f"communication {max(0.0, with_comm - without) / with_comm:.3f} of a step")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
