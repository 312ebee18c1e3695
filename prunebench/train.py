"""Training and evaluation loops over in-memory tensors, with masks enforced every step."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .masks import Masks


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
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def make_lr_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, epochs: int):
    """Stepped once per epoch."""
    if cfg.lr_schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
    if cfg.lr_schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.lr_milestones), cfg.lr_gamma)
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    raise ValueError(f"unknown lr schedule {cfg.lr_schedule!r}")


def autocast(precision: str, device: torch.device):
    """bf16 autocast for forward and loss, or nothing."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


class Diverged(RuntimeError):
    """The training loss became NaN or infinite: the run stops and is recorded as diverged."""


@dataclass
class FitState:
    """A training phase in progress: what continues it exactly (see checkpoint.py)."""

    epoch: int  # epochs completed
    batch: int  # mini-batches of the next epoch already trained (nonzero only after a stop signal)
    optimizer: Dict[str, Any]
    schedule: Dict[str, Any]
    order: torch.Tensor  # the data-order generator's state when that epoch began
    loss_sum: Optional[torch.Tensor]  # that epoch's summed training loss so far
    seconds: float  # that epoch's time so far

    def to_dict(self) -> Dict[str, Any]:
        return dict(vars(self))


class Checkpointing(Protocol):
    """What `fit` asks of the run to checkpoint a phase (pipeline.py provides it)."""

    every_epochs: int  # 0: only on a stop signal
    stopping: bool  # a stop signal has arrived

    def save(self, state: FitState) -> None: ...

    def stop(self, state: Optional[FitState]) -> None: ...  # save `state` (if given), then raise Interrupted


class MaskUpdates(Protocol):
    """What changes the masks while a phase trains (gradual pruning, SET, RigL)."""

    def due(self, step: int) -> bool: ...  # after optimizer step `step` (1-based, within the phase)

    def update(self, step: int, model: nn.Module, batch: Tuple[torch.Tensor, torch.Tensor]) -> Masks:
        """The masks to train on from here (`batch`: the step's own mini-batch)."""


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


def fit(model: nn.Module, data, cfg: TrainConfig, epochs: int, lr: float,
        generator: torch.Generator, masks: Optional[Masks] = None,
        on_epoch_end: Optional[Callable[[EpochResult], None]] = None,
        checkpoints: Optional[Checkpointing] = None, resume: Optional[FitState] = None,
        updates: Optional[MaskUpdates] = None) -> List[EpochResult]:
    """Train `epochs` epochs with a fresh optimizer and LR schedule; pruned weights stay zero.

    The pruned weights are zeroed first, their gradients before every optimizer step (the
    optimizer is new, so its state is zero there too and every update of a pruned weight is
    exactly 0), and every epoch ends by checking that none of them moved.

    `checkpoints` saves the phase every `every_epochs` epochs and, on a stop signal, at the next
    mini-batch; `resume` continues a phase so saved exactly where it stopped. `updates` may change
    the masks after any step: the new pruned weights and their optimizer state are zeroed.
    """
    bound = masks.bind(model) if masks is not None and not masks.is_dense() else None
    if bound is not None:
        bound.zero_weights()
    opt = make_optimizer(model, cfg, lr)
    schedule = make_lr_schedule(opt, cfg, epochs)
    if resume is not None:
        opt.load_state_dict(resume.optimizer)
        schedule.load_state_dict(resume.schedule)
    results = []
    per_epoch = steps_per_epoch(data, cfg.batch_size)
    for epoch in range(1 + (resume.epoch if resume else 0), epochs + 1):
        start = time.perf_counter()
        order = generator.get_state()
        loss_sum, done = None, 0
        if resume is not None and epoch == resume.epoch + 1:
            # the saved epoch's order; stopped mid-epoch, skip the batches already trained
            generator.set_state(resume.order)
            order, loss_sum, done = resume.order, resume.loss_sum, resume.batch
            if loss_sum is not None:  # a checkpoint loads onto the CPU
                loss_sum = loss_sum.to(next(model.parameters()).device)
            start -= resume.seconds
        model.train()
        for i, (x, y) in enumerate(data.train_batches(cfg.batch_size, generator)):
            if i < done:
                continue
            if checkpoints is not None and checkpoints.stopping:  # a flag read per step, nothing more
                checkpoints.stop(FitState(epoch - 1, i, opt.state_dict(), schedule.state_dict(), order, loss_sum,
                                          time.perf_counter() - start))
            with autocast(cfg.precision, x.device):
                loss = F.cross_entropy(model(to_layout(x, cfg.channels_last)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if bound is not None:
                bound.zero_grads()
            opt.step()
            batch_loss = loss.detach() * y.shape[0]  # summed on the device: no sync per step
            loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
            if updates is not None and updates.due((epoch - 1) * per_epoch + i + 1):
                new = updates.update((epoch - 1) * per_epoch + i + 1, model, (x, y))
                restart_changed(model, opt, masks, new)
                masks, bound = new, new.bind(model)
                model.train()  # the update may have evaluated the model
        train_loss = float(loss_sum) / data.num_examples("train")  # the epoch's one sync
        if not math.isfinite(train_loss):
            raise Diverged(f"the training loss became {train_loss} in epoch {epoch}")
        if bound is not None:
            bound.check_weights()
        epoch_lr = opt.param_groups[0]["lr"]
        schedule.step()
        result = EpochResult(epoch, train_loss, epoch_lr, time.perf_counter() - start)
        results.append(result)
        if on_epoch_end is not None:
            on_epoch_end(result)
        # the phase's last epoch is saved by the run's own checkpoint that follows it
        if checkpoints is not None and epoch < epochs:
            checkpoint_epoch_end(checkpoints, epoch, opt, schedule, generator)
    return results


def checkpoint_epoch_end(checkpoints: Checkpointing, epoch: int, opt, schedule, generator) -> None:
    """Save every `every_epochs` epochs; on a stop signal, save (if not just saved) and stop."""
    due = checkpoints.every_epochs and epoch % checkpoints.every_epochs == 0
    if due or checkpoints.stopping:
        state = FitState(epoch, 0, opt.state_dict(), schedule.state_dict(), generator.get_state(), None, 0.0)
        if due:
            checkpoints.save(state)
        if checkpoints.stopping:
            checkpoints.stop(None if due else state)  # already saved: only stop


@dataclass
class EvalResult:
    accuracy: float  # correct / total over the whole set
    loss: float  # mean cross-entropy over the whole set
    correct: int
    total: int


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
             precision: str = "fp32", channels_last: bool = False) -> EvalResult:
    """Accuracy = correct / total and mean loss over every example the batches hold."""
    model.eval()
    total = 0
    sums = []
    for x, y in batches:
        with autocast(precision, x.device):
            logits = model(to_layout(x, channels_last)).float()
        sums.append(torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                                 (logits.argmax(1) == y).sum().double()]))
        total += y.shape[0]
    if total == 0:
        raise ValueError("evaluate() got no examples")
    loss_sum, correct = torch.stack(sums).sum(0).tolist()  # one sync for the whole set
    return EvalResult(int(correct) / total, loss_sum / total, int(correct), total)
