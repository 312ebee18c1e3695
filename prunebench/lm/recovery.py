"""Recovery: training a pruned language model back before its final perplexity (recovery=full,
recovery=lora), optionally distilled from the dense model's logits.
"""

from __future__ import annotations

import math
import time
from typing import Dict

import torch
from torch import Tensor, nn

from ..config import ConfigError, RecoveryConfig, TrainConfig
from ..runs.checkpoint import StopSignals
from ..runs.record import Recorder
from ..training.loop import make_lr_schedule, make_optimizer
from .packed import PackedMasks


def reads_train(cfg: RecoveryConfig) -> bool:
    """Whether recovery trains on the dataset's training split (which the run must then load)."""
    return cfg.trains and cfg.data == "train"


def training_recipe(cfg: RecoveryConfig) -> TrainConfig:
    """The recovery's optimizer and schedule, as the training loop's helpers take them."""
    return TrainConfig(optimizer="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
                       lr_schedule=cfg.lr_schedule, epochs=cfg.epochs, pretrain_epochs=0, finetune_epochs=0)


def recover(exp, rec: Recorder, stop: StopSignals) -> float:
    """recovery=full: recovery.epochs over the recovery windows, shuffled each epoch, masks held;
    `exp` is the run's lm.recipe.LMExperiment. Returns the seconds it took.

    Mixed precision when the model is in half precision: the optimizer updates float32 master
    weights (an AdamW step at lr 2e-5 is below half a bfloat16 ulp of most weights: it would round
    away), forward and backward run under autocast in the model's dtype (float16 with a loss
    scale against underflowing gradients), and the weights go back to the model's dtype at the
    end, the pruned ones exactly 0. The masks are held packed, one bit per weight (packed.py)."""
    cfg, model = exp.cfg, exp.model
    if cfg.recovery.name != "full":
        raise ConfigError(f"recovery={cfg.recovery.name} is not implemented")
    recipe = training_recipe(cfg.recovery)
    windows = torch.stack(exp.data.eval_windows("train", exp.seq_len, "drop"))
    order_rng = torch.Generator().manual_seed(cfg.seed)
    steps = math.ceil(windows.shape[0] / recipe.batch_size)
    model.to(exp.device).train()
    cast_parameters(model, torch.float32)
    masks = PackedMasks.of_zeros(model, exp.masks)
    opt = make_optimizer(model, recipe, recipe.lr)
    schedule = make_lr_schedule(opt, recipe, recipe.epochs, steps)
    step = MixedPrecisionStep(model, opt, masks, exp.dtype, exp.device)
    started = time.perf_counter()
    for epoch in range(1, recipe.epochs + 1):
        t, loss_sum = time.perf_counter(), torch.zeros((), dtype=torch.float64, device=exp.device)
        for idx in torch.randperm(windows.shape[0], generator=order_rng).split(recipe.batch_size):
            loss_sum += step(windows[idx].to(exp.device)).double() * idx.numel()  # on the device: no sync per step
            stop.check()
        schedule.step()
        masks.check_weights()
        rec.epoch("finetune", 1, epoch, recipe.epochs, float(loss_sum) / windows.shape[0], opt.param_groups[0]["lr"],
                  time.perf_counter() - t, **step.figures())
    del opt, step  # the optimizer's state, before a second copy of the weights is made
    cast_parameters(model, exp.dtype)
    model.to("cpu").eval()
    return time.perf_counter() - started


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """The parameters (not the buffers: rotary tables and the like keep the dtype they were
    loaded in) as `dtype`, in place."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)


class MixedPrecisionStep:
    """One optimizer step on a batch of windows: autocast in `dtype` when it is not float32,
    float16's loss scaled (GradScaler: a step whose gradients overflow is skipped and the scale
    halved), the pruned gradients zeroed before the step."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, masks: PackedMasks, dtype: torch.dtype,
                 device: torch.device):
        self.model, self.opt, self.masks, self.dtype, self.device = model, opt, masks, dtype, device
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def __call__(self, ids: Tensor) -> Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.masks.zero_grads()
        self.scaler.step(self.opt)
        self.scaler.update()
        return loss.detach()

    def figures(self) -> Dict:
        """For each epoch's record: float16's loss scale (read once an epoch: reading syncs the device)."""
        return {"loss_scale": self.scaler.get_scale()} if self.scaler.is_enabled() else {}
