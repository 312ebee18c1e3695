"""The run's device: which one, how it computes there (TF32, deterministic algorithms), its
random streams, and how much memory a criterion may take on it."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from ..config import CUBLAS_WORKSPACE, ConfigError
from .distributed import world


def resolve_device(name: str) -> torch.device:
    """auto: the current CUDA device when there is one, else the CPU; cuda: the current one
    (a parallel job on a GPU node is given its own, see cli.py); cuda:N: that one."""
    if name.startswith("cuda:") and world().distributed:
        raise ConfigError(f"device={name} under torchrun would put every rank on that one GPU; use device=cuda "
                          f"(each rank takes the GPU of its LOCAL_RANK; CUDA_VISIBLE_DEVICES chooses the GPUs)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name} was asked for but no CUDA device is available; use device=cpu or auto")
        index = int(name.partition(":")[2] or torch.cuda.current_device())
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device={name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device("cuda", index)
    return torch.device(name)


def configure_backends(deterministic: bool, tf32: bool) -> None:
    """Set, both ways, the global switches that change GPU numbers (so runs in one process do
    not inherit each other's). On the CPU they change nothing: its kernels are deterministic.

    deterministic: deterministic algorithms where PyTorch has them (a warning names an op that
    has none) and cuDNN's deterministic convolutions; else cuDNN may benchmark and pick the
    fastest convolution for each shape. tf32: TensorFloat-32 (10-bit mantissa) for convolutions
    and matrix products on GPUs that have it; else full fp32."""
    if deterministic:  # read once, when cuBLAS starts: the command sets it at start-up (cli.py)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    if (torch.are_deterministic_algorithms_enabled() != deterministic
            or torch.is_deterministic_algorithms_warn_only_enabled() != deterministic):
        # only on a change: the call imports torch's compiler stack (a second or more)
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32


def autocast(precision: str, device: torch.device):
    """bf16 autocast for forward and loss, or nothing."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@contextmanager
def exact_fp32() -> Iterator[None]:
    """Full fp32 convolutions and matrix products inside (TF32 off), the previous setting after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draws inside come from `seed`; every global stream (CPU and each visible GPU) is as it
    was afterwards. (torch.manual_seed reseeds every CUDA generator, and fork_rng restores only
    the devices it is given.)"""
    gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(seed)
        yield


# -------------------------------------------------------------------------------- memory
def free_memory(device: torch.device) -> int:
    """Bytes free now: the GPU's, or the memory the OS says is available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def memory_budget(memory_gb: Optional[float], device: torch.device) -> int:
    """What curvature estimates may hold at once: `memory_gb`, or 80% of what is free now."""
    if memory_gb is not None:
        return int(memory_gb * 2**30)
    return int(0.8 * free_memory(device))


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
