"""One run over several processes with torch.distributed (DistributedDataParallel).

Started by torchrun (`torchrun --nproc_per_node=N -m prunebench ...`), which sets RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous (MASTER_ADDR, MASTER_PORT). NCCL on GPUs, gloo on CPUs.

What each rank does, so that a run of P processes computes what one process computes with the
same global batch:
- training: every rank draws the same global batch (the same seeded order) and trains on its
  contiguous shard; the loss is the shard's summed loss × P / global batch, so DDP's average of the
  ranks' gradients is the global batch's mean gradient, whatever the shards' sizes;
- batch-norm statistics: each rank's running mean and variance follow its own shards (DDP does
  not broadcast buffers before each forward here) and are averaged over the ranks at the end of
  every epoch, before anything evaluates: the statistics of every shard, not rank 0's alone (the
  running mean is linear in the batch means, so with equal shards its average is the one-process
  value; the variance misses only the spread between the shards' means);
- evaluation: rank r takes the batches i ≡ r (mod P); correct counts and losses are summed over ranks;
- pruning: every rank scores on the same global batches, but GPU kernels may differ in the last
  bits from rank to rank (algorithm choice, atomics), so rank 0's masks and pruned weights are
  broadcast to the others each round; the trained weights are checked equal on every rank by a
  digest after each training phase (what DDP must keep identical);
- files: only rank 0 writes the run directory (records, summary, checkpoint, wandb); every rank
  resumes from rank 0's checkpoint (the state is the same on every rank).
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Dict, Iterable, List, Optional

import torch
from torch import Tensor


class DistributedError(RuntimeError):
    """The ranks disagree, or a distributed run cannot do what was asked."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


_WORLD = World()


def world() -> World:
    return _WORLD


def launched() -> Optional[World]:
    """The world torchrun (or a SLURM task) describes in the environment, if more than one process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def init() -> World:
    """Join the process group once (gloo, and NCCL for CUDA tensors when there is a GPU)."""
    global _WORLD
    found = launched()
    if found is None or torch.distributed.is_initialized():
        return _WORLD
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(found.local_rank % torch.cuda.device_count())
    torch.distributed.init_process_group(backend=backend)
    _WORLD = found
    if "TORCHELASTIC_RUN_ID" in os.environ:
        end_with_launcher()
    threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", found.size)))
    torch.set_num_threads(threads)  # the node's cores shared among its ranks
    return _WORLD


def end_with_launcher() -> None:
    """A torchrun worker is stopped (SIGTERM: it checkpoints and ends) when its launcher dies:
    torchrun puts its workers in their own sessions, so a launcher killed with SIGKILL, as a
    failing node or an impatient user does, would otherwise leave them running to the end, holding
    the run directory's lock against the rerun. Linux only (prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the launcher was already gone before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def join_slurm_tasks() -> World:
    """A SLURM job of several tasks (hydra/launcher=slurm with hydra.launcher.tasks_per_node or
    nodes > 1): each task is a rank. submitit derives the rendezvous (MASTER_ADDR: the job's first
    node; RANK, WORLD_SIZE, LOCAL_RANK from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID). Ranks > 0
    leave the job's log file to rank 0 (and the console: the caller, cli.py, quiets it)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1 or "RANK" in os.environ:
        return init()
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    w = init()
    if not w.main:
        import logging

        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)
        root.setLevel(logging.WARNING)
    return w


def shared_run_dir(default_root: str = "outputs") -> str:
    """Rank 0's run directory name (outputs/<date>/<time>), the same on every rank."""
    name = [datetime.now().strftime(f"{default_root}/%Y-%m-%d/%H-%M-%S")] if world().main else [None]
    torch.distributed.broadcast_object_list(name, src=0)
    return name[0]


def cli_overrides(argv: List[str]) -> List[str]:
    """Under torchrun: one run directory for every rank, and Hydra's files and the log file from
    rank 0 only (the other ranks log warnings to the console)."""
    if launched() is None:
        return []
    if "-m" in argv or "--multirun" in argv:
        raise DistributedError("a sweep (-m) under torchrun would start the whole sweep on every rank; run one "
                               "torchrun per run, or hydra/launcher=slurm with hydra.launcher.tasks_per_node")
    w = init()
    out = [] if any(a.startswith("hydra.run.dir=") for a in argv) else [f"hydra.run.dir={shared_run_dir()}"]
    if not w.main:
        out += ["hydra.output_subdir=null", "hydra.job_logging.handlers.file.filename=/dev/null",
                "hydra.job_logging.root.level=WARNING"]
    return out


# ------------------------------------------------------------------------------ collectives
def shard(t: Tensor) -> Tensor:
    """This rank's contiguous part of a global batch."""
    w = world()
    return torch.tensor_split(t, w.size)[w.rank] if w.distributed else t


def all_sum(t: Tensor) -> Tensor:
    """The sum over ranks (in place, returned)."""
    if world().distributed:
        torch.distributed.all_reduce(t)
    return t


def barrier() -> None:
    if world().distributed:
        torch.distributed.barrier()


def average_norm_statistics(model: torch.nn.Module) -> None:
    """Every batch norm's running mean and variance averaged over the ranks (in place), so that
    every rank evaluates, scores and checkpoints with the same statistics."""
    if not world().distributed:
        return
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats:
            for buf in (m.running_mean, m.running_var):
                if buf is not None:
                    torch.distributed.all_reduce(buf)
                    buf.div_(world().size)


@torch.no_grad()
def broadcast_from_main(tensors: Iterable[Tensor]) -> None:
    """Rank 0's values into every rank's tensors (in place)."""
    if not world().distributed:
        return
    for t in tensors:
        if t.is_contiguous():
            torch.distributed.broadcast(t, src=0)
        else:  # the collective writes into contiguous memory
            buf = t.contiguous()
            torch.distributed.broadcast(buf, src=0)
            t.copy_(buf)


def from_main(value):
    """Rank 0's `value` (any picklable object) on every rank."""
    if not world().distributed:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def digest(tensors: Dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_same(what: str, tensors: Dict[str, Tensor]) -> None:
    """Raise on every rank when the ranks' tensors differ (by digest)."""
    if not world().distributed:
        return
    mine = digest(tensors)
    every: List[Optional[str]] = [None] * world().size
    torch.distributed.all_gather_object(every, mine)
    differ = [r for r, d in enumerate(every) if d != every[0]]
    if differ:
        raise DistributedError(f"the {what} of rank(s) {differ} differ from rank 0's: the ranks no longer compute "
                               f"the same run; it stops (nothing of this round is recorded)")
