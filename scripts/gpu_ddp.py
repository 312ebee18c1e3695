"""Two processes on one machine, under torchrun (scripts/gpu_check.sh):

    torchrun --standalone --nproc_per_node=2 scripts/gpu_ddp.py probe [--backend nccl|gloo]
    torchrun --standalone --nproc_per_node=2 scripts/gpu_ddp.py run --backend gloo -- PRUNEBENCH_ARGS...

`probe`: the process group and three collectives (all_reduce, broadcast, all_gather_object) on the
device prunebench gives each rank (cuda:<local rank mod GPUs>, so with one GPU both ranks share
cuda:0; the CPU without one). Rank 0 prints one line: `probe ok: ...` or `probe FAILED: <why>`.
NCCL refuses two ranks on one GPU in the versions that check for it ("Duplicate GPU detected").

`run`: the prunebench command, with the process group's backend replaced by the one given
(`gloo`: gloo for CPU and CUDA tensors): what two ranks on one GPU can use when NCCL refuses
them. prunebench itself (distributed.init) always asks for NCCL for CUDA tensors.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta


def device_of_rank():
    import torch

    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def probe(backend: str) -> int:
    import torch
    import torch.distributed as dist

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = device_of_rank()
    what = backend + (f" {'.'.join(map(str, torch.cuda.nccl.version()))}" if backend == "nccl" else "")
    try:
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=60))
        t = torch.full((1024,), float(rank + 1), device=device)
        dist.all_reduce(t)
        expected = size * (size + 1) / 2
        if not bool((t == expected).all()):
            raise RuntimeError(f"all_reduce gave {float(t[0])} instead of {expected}")
        b = torch.full((16,), float(rank), device=device)
        dist.broadcast(b, src=0)
        if not bool((b == 0).all()):
            raise RuntimeError("broadcast from rank 0 did not arrive")
        devices = [None] * size
        dist.all_gather_object(devices, str(device))
        dist.barrier()
        dist.destroy_process_group()
    except Exception as e:  # the backend's own words, first line
        first = (str(e).strip().splitlines() or [type(e).__name__])
        detail = next((line for line in first if "Duplicate GPU" in line), first[0])
        print(f"probe FAILED: {what}, rank {rank} on {device}: {type(e).__name__}: {detail[:300]}", flush=True)
        return 1
    if rank == 0:
        print(f"probe ok: {what}, {size} ranks on {', '.join(devices)}: all_reduce, broadcast, all_gather_object",
              flush=True)
    return 0


def run(backend: str, args) -> None:
    import torch.distributed as dist

    asked = dist.init_process_group

    def with_backend(*a, **k):
        k["backend"] = backend
        return asked(*a, **k)

    dist.init_process_group = with_backend
    from prunebench.cli import main as prunebench_main

    sys.argv = ["prunebench", *args]
    prunebench_main()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--backend", default=None, help="default: nccl with a GPU, gloo without")
    r = sub.add_parser("run")
    r.add_argument("--backend", required=True, help="e.g. gloo, or cpu:gloo,cuda:gloo")
    r.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if "RANK" not in os.environ:
        print("gpu_ddp: start it with torchrun (RANK is not set)", file=sys.stderr)
        return 2
    if args.command == "probe":
        import torch

        return probe(args.backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    run(args.backend, args.args[1:] if args.args[:1] == ["--"] else args.args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
