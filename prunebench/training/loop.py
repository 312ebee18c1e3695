"""Training and evaluation loops over in-memory tensors, with masks enforced every step."""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..core.device import autocast, to_layout
from ..core.distributed import all_sum, average_norm_statistics, world
from ..core.masks import Masks
from .hooks import Hook


@dataclass
class EpochResult:
    epoch: int  # 1-based within the phase
    train_loss: float
    lr: float
    seconds: float


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    # fused kernels: one pass per tensor, and (measured on CPU) the unfused Adam's sqrt is ~5x
    # slower on the exact zeros that pruned weights leave in its second-moment state
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=lr, fused=True)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def decay_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW's parameter groups, as ViT/DeiT train: biases, norm scales and shifts (every tensor
    of one dimension) and the model's `no_weight_decay()` parameters (a ViT's class token and
    position embeddings) are not decayed. (A pruned weight stays 0 either way: decay scales it.)"""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, rest = [], []
    for name, p in model.named_parameters():
        (rest if p.dim() <= 1 or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_lr_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, epochs: int, steps_per_epoch: int = 0):
    """Stepped once per epoch; with train.warmup_epochs, once per optimizer step (`per_step`)."""
    if cfg.warmup_epochs:
        return torch.optim.lr_scheduler.LambdaLR(opt, warmup_factor(cfg, epochs, steps_per_epoch))
    if cfg.lr_schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
    if cfg.lr_schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.lr_milestones), cfg.lr_gamma)
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    raise ValueError(f"unknown lr schedule {cfg.lr_schedule!r}")


def per_step(cfg: TrainConfig) -> bool:
    """Whether the phase's LR schedule steps after every optimizer step (warmup) or every epoch."""
    return cfg.warmup_epochs > 0


def warmup_factor(cfg: TrainConfig, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """lr factor of optimizer step t (0-based) of a phase of `epochs`: (t + 1) / W over the W warmup
    steps (capped at the phase), then lr_schedule: cosine from 1 to 0 over the remaining steps,
    step: lr_gamma per milestone epoch passed, constant: 1."""
    if steps_per_epoch < 1:
        raise ValueError("a warmup schedule needs the phase's steps per epoch")
    total = epochs * steps_per_epoch
    warmup = min(cfg.warmup_epochs, epochs) * steps_per_epoch
    milestones = list(cfg.lr_milestones)

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - warmup) / max(1, total - warmup))))
        if cfg.lr_schedule == "step":
            return cfg.lr_gamma ** sum(m <= t // steps_per_epoch for m in milestones)
        return 1.0

    return factor


class Diverged(RuntimeError):
    """The training loss became NaN or infinite: the run stops and is recorded as diverged."""


@dataclass
class FitState:
    """A training phase in progress: what continues it exactly (see runs/checkpoint.py)."""

    epoch: int  # epochs completed
    batch: int  # mini-batches of the next epoch already trained (nonzero only after a stop signal)
    optimizer: Dict[str, Any]
    schedule: Dict[str, Any]
    order: torch.Tensor  # the data-order generator's state when that epoch began
    loss_sum: Optional[torch.Tensor]  # that epoch's summed training loss so far
    seconds: float  # that epoch's time so far

    def to_dict(self) -> Dict[str, Any]:
        return dict(vars(self))


def steps_per_epoch(data, batch_size: int) -> int:
    return math.ceil(data.num_examples("train") / batch_size)


@torch.no_grad()
def restart_changed(model: nn.Module, opt: torch.optim.Optimizer, old: Optional[Masks], new: Masks) -> None:
    """After a mask change: weights pruned now and weights regrown now are set to zero, and so is
    their optimizer state (momentum, Adam's moments), so that a pruned weight stays zero and a
    regrown one starts from zero; the weights kept are left as they are."""
    params = dict(model.named_parameters())
    for name, mask in new.items():
        keep = mask if old is None or name not in old else mask * old[name].to(mask)
        p = params[name]
        p.mul_(keep)
        for value in opt.state.get(p, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                value.mul_(keep)


class Loop:
    """A training phase in progress, as its hooks see it: the network, its optimizer and masks,
    and where the phase is (what `state` saves to continue it exactly)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, epochs: int, lr: float, generator: torch.Generator,
                 masks: Optional[Masks], steps: int = 0):
        """`steps`: optimizer steps per epoch (what a per-step LR schedule counts in)."""
        self.model, self.cfg, self.epochs, self.generator = model, cfg, epochs, generator
        self.net = data_parallel(model)  # what forward and backward go through (DDP over the ranks)
        self.opt = make_optimizer(model, cfg, lr)
        self.schedule = make_lr_schedule(self.opt, cfg, epochs, steps)
        self.per_step, self.lr = per_step(cfg), lr  # lr: of the last step (what a per-step epoch reports)
        self.masks, self.bound = None, None
        if masks is not None and not masks.is_dense():
            self.masks, self.bound = masks, masks.bind(model)
            self.bound.zero_weights()
        self.epochs_done, self.batch, self.step = 0, 0, 0
        self.in_epoch, self.order, self.loss_sum, self.started = False, None, None, 0.0

    def resume(self, state: FitState) -> None:
        """Continue a phase saved by `state()`: from the next epoch, or inside the stopped one."""
        self.opt.load_state_dict(state.optimizer)
        self.schedule.load_state_dict(state.schedule)
        self.lr = self.opt.param_groups[0]["lr"]
        self.epochs_done = state.epoch
        self.generator.set_state(state.order)  # that epoch's order
        if state.batch:  # stopped mid-epoch: skip the batches already trained
            device = next(self.model.parameters()).device  # a checkpoint loads onto the CPU
            self.in_epoch, self.order, self.batch = True, state.order, state.batch
            self.loss_sum = None if state.loss_sum is None else state.loss_sum.to(device)
            self.started = time.perf_counter() - state.seconds

    def begin_epoch(self) -> int:
        """Batches of this epoch to skip (those trained before a stop)."""
        if self.in_epoch:
            return self.batch
        self.in_epoch, self.order, self.loss_sum, self.batch = True, self.generator.get_state(), None, 0
        self.started = time.perf_counter()
        return 0

    def train_step(self, x: torch.Tensor, y: torch.Tensor, global_batch: Optional[int] = None) -> None:
        """One step on (x, y): the whole batch, or this rank's shard of a global batch of
        `global_batch` examples (the loss scaled so that DDP's average over the ranks is the
        global batch's mean gradient)."""
        with autocast(self.cfg.precision, x.device):
            summed = F.cross_entropy(self.net(to_layout(x, self.cfg.channels_last)), y, reduction="sum")
        loss = summed / y.shape[0] if global_batch is None else summed * world().size / global_batch
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.bound is not None:
            self.bound.zero_grads()
        self.opt.step()
        if self.per_step:
            self.lr = self.opt.param_groups[0]["lr"]
            self.schedule.step()
        batch_loss = summed.detach().float()  # summed on the device: no sync per step
        self.loss_sum = batch_loss if self.loss_sum is None else self.loss_sum + batch_loss

    def end_epoch(self, examples: int) -> EpochResult:
        train_loss = float(all_sum(self.loss_sum.clone())) / examples  # the epoch's one sync (over the ranks)
        epoch = self.epochs_done + 1
        if not math.isfinite(train_loss):
            raise Diverged(f"the training loss became {train_loss} in epoch {epoch}")
        average_norm_statistics(self.model)  # the ranks' shards' batch-norm statistics, before any evaluation
        if self.bound is not None:
            self.bound.check_weights()
        lr = self.lr
        if not self.per_step:
            lr = self.opt.param_groups[0]["lr"]
            self.schedule.step()
        self.epochs_done, self.batch, self.in_epoch = epoch, 0, False
        return EpochResult(epoch, train_loss, lr, time.perf_counter() - self.started)

    def set_masks(self, new: Masks) -> None:
        """Train on `new` from here: weights it prunes (and regrows) restart at zero."""
        restart_changed(self.model, self.opt, self.masks, new)
        self.masks, self.bound = new, new.bind(self.model)

    def state(self) -> FitState:
        """What continues the phase exactly from here: between two steps, or after an epoch."""
        if self.in_epoch:
            return FitState(self.epochs_done, self.batch, self.opt.state_dict(), self.schedule.state_dict(),
                            self.order, self.loss_sum, time.perf_counter() - self.started)
        return FitState(self.epochs_done, 0, self.opt.state_dict(), self.schedule.state_dict(),
                        self.generator.get_state(), None, 0.0)


def data_parallel(model: nn.Module) -> nn.Module:
    """The model wrapped in DistributedDataParallel over the ranks (the model itself in one process)."""
    if not world().distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    # no buffer broadcast before each forward: each rank's batch-norm statistics follow its own
    # shards and are averaged at the epoch's end (Loop.end_epoch), instead of rank 0's alone
    no_sync = ({"forward_sync_buffers": False}  # torch 2.14 renamed broadcast_buffers
               if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None, **no_sync)


def overriding(hooks: Sequence[Hook], method: str) -> List[Callable]:
    return [getattr(h, method) for h in hooks if getattr(type(h), method) is not getattr(Hook, method)]


def fit(model: nn.Module, data, cfg: TrainConfig, epochs: int, lr: float, generator: torch.Generator,
        masks: Optional[Masks] = None, hooks: Sequence[Hook] = (), resume: Optional[FitState] = None
        ) -> List[EpochResult]:
    """Train `epochs` epochs with a fresh optimizer and LR schedule; pruned weights stay zero.

    The pruned weights are zeroed first, their gradients before every optimizer step (the
    optimizer is new, so its state is zero there too and every update of a pruned weight is
    exactly 0), and every epoch ends by checking that none of them moved. `hooks` hear each step
    and epoch (and may change the masks); `resume` continues a phase saved by `Loop.state`.
    """
    per_epoch, results = steps_per_epoch(data, cfg.batch_size), []
    loop = Loop(model, cfg, epochs, lr, generator, masks, per_epoch)
    if resume is not None:
        loop.resume(resume)
    before, after, epoch_end = (overriding(hooks, m) for m in ("before_step", "after_step", "epoch_end"))
    for epoch in range(loop.epochs_done + 1, epochs + 1):
        skip = loop.begin_epoch()
        model.train()
        ranks = world().distributed  # every rank draws the same global batches and trains on its shard of each
        for i, (x, y) in enumerate(data.train_batches(cfg.batch_size, generator, rank_shard=ranks)):
            if i < skip:
                continue
            loop.batch, loop.step = i, (epoch - 1) * per_epoch + i + 1
            for hook in before:
                hook(loop)
            global_batch = min(cfg.batch_size, data.num_examples("train") - i * cfg.batch_size)
            loop.train_step(x, y, global_batch if ranks else None)
            loop.batch = i + 1
            for hook in after:
                hook(loop, (x, y))
        results.append(loop.end_epoch(data.num_examples("train")))
        for hook in epoch_end:
            hook(loop, results[-1])
    return results


