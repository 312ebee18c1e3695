"""Recovery: training a pruned language model back before its final perplexity (recovery=full,
recovery=lora), optionally distilled from the dense model's logits.

    recovery=full   every surviving weight, float32 master weights, the pruned ones held at 0
    recovery=lora   LoRA adapters (peft) beside the frozen pruned weights; afterwards merged into
                    them when they are dense (structured or no pruning), else kept apart
    distill > 0     (1 − distill) · CE + distill · T² · KL(teacher ‖ student) at temperature T,
                    the teacher a frozen copy of the dense model (dense_teacher, before pruning)

The recipe calls `check` and `dense_teacher` before any work and `recover` after pruning;
`recover` returns the figures the run's row records (seconds, windows, data, LoRA's).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LM_STRUCTURES, ConfigError, RecoveryConfig, TrainConfig
from ..runs.checkpoint import StopSignals
from ..runs.record import Recorder
from ..training.loop import make_lr_schedule, make_optimizer
from . import hub, moe
from .packed import PackedMasks
from .text import TextData, document_windows, load_text, text_dataset

def reads_train(cfg: RecoveryConfig) -> bool:
    """Whether recovery trains on the dataset's training split (which the run must then load)."""
    return cfg.trains and cfg.data == "train"


def training_recipe(cfg: RecoveryConfig) -> TrainConfig:
    """The recovery's optimizer and schedule, as the training loop's helpers take them."""
    return TrainConfig(optimizer="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
                       lr_schedule=cfg.lr_schedule, epochs=cfg.epochs, pretrain_epochs=0, finetune_epochs=0)


# ------------------------------------------------------------------------------ before any work
def check(exp) -> None:
    """What only the loaded model and text can refuse (LoRA's targets, a text without a window),
    before the dense perplexity and the pruning."""
    rc = exp.cfg.recovery
    if not rc.trains:
        return
    if rc.name == "lora":
        lora_targets(exp.model, rc.targets)
    source, split = recovery_text(exp)
    if source.max_windows(split, exp.seq_len) == 0:
        raise ConfigError(f"recovery.data={rc.data}: {source.name}'s {split} split holds fewer than "
                          f"dataset.seq_len={exp.seq_len} tokens")


def dense_teacher(exp) -> Optional[nn.Module]:
    """A frozen copy of the dense model, in eval mode, for distillation (recovery.distill > 0);
    the recipe takes it before pruning. None when nothing distils."""
    rc = exp.cfg.recovery
    if not (rc.trains and rc.distill > 0):
        return None
    teacher = copy.deepcopy(exp.model).eval()
    return teacher.requires_grad_(False)


# ------------------------------------------------------------------------------ the windows
def recovery_text(exp) -> Tuple[TextData, str]:
    """The text and split that recovery trains on: the run's training split, or the calibration
    text's split (calibration.dataset, or the run's dataset when null; calibration.source)."""
    cfg = exp.cfg
    if cfg.recovery.data == "train":
        return exp.data, "train"
    cal = cfg.calibration
    if cal.dataset is not None:
        text = text_dataset(cal.dataset, cal.hub_name)
    elif cal.source in exp.data.splits:
        return exp.data, cal.source
    else:
        text = cfg.dataset
    return load_text(text, exp.tokenizer, cfg.data_dir, [cal.source]), cal.source


def recovery_windows(exp, generator: torch.Generator) -> Tuple[Tensor, Dict]:
    """(windows, seq_len) tensor: every window of the split, or a seeded draw of recovery.windows
    of them; and what was used, for the run's row."""
    rc = exp.cfg.recovery
    source, split = recovery_text(exp)
    tokens = source.splits[split]
    if isinstance(tokens, Tensor):
        windows = torch.stack(source.eval_windows(split, exp.seq_len, "drop"))
        if rc.windows is not None and rc.windows < windows.shape[0]:
            windows = windows[torch.randperm(windows.shape[0], generator=generator)[:rc.windows].sort().values]
    else:  # C4's training shard: documents (the config asks for recovery.windows)
        windows = document_windows(tokens, exp.tokenizer, rc.windows, exp.seq_len, generator)
    about = {"recovery_data": rc.data, "recovery_dataset": source.name, "recovery_split": split,
             "recovery_windows": int(windows.shape[0]), "recovery_tokens": int(windows.numel())}
    return windows, about


# ------------------------------------------------------------------------------ recovery
def recover(exp, rec: Recorder, stop: StopSignals, teacher: Optional[nn.Module] = None) -> Dict:
    """recovery.epochs over the recovery windows, shuffled each epoch, the pruned weights held at 0;
    `exp` is the run's lm.recipe.LMExperiment, `teacher` dense_teacher's model. Returns the row's
    figures, "seconds" among them. Afterwards exp.model is the recovered model on the CPU: with
    LoRA kept apart, a peft model (save_adapter takes the adapter off)."""
    cfg, rc = exp.cfg, exp.cfg.recovery
    if rc.name not in ("full", "lora"):
        raise ConfigError(f"recovery={rc.name} is not implemented")
    if rc.distill > 0 and teacher is None:
        raise ValueError("recovery.distill > 0 needs the dense model: pass dense_teacher(exp), taken before pruning")
    generator = torch.Generator().manual_seed(cfg.seed)
    windows, figures = recovery_windows(exp, generator)
    figures.update(recovery_distill=rc.distill, **({"recovery_temperature": rc.temperature} if rc.distill else {}))
    started = time.perf_counter()
    exp.model.to(exp.device)
    masks = PackedMasks.of_zeros(exp.model, exp.masks)  # before peft renames the layers
    if rc.name == "full":
        cast_parameters(exp.model, torch.float32)  # master weights (see MixedPrecisionStep)
        opt = make_optimizer(exp.model, training_recipe(rc), rc.lr)
    else:
        exp.model = attach_lora(exp.model, rc)
        opt = adapter_optimizer(exp.model, rc)
        figures.update(lora_figures(exp.model, rc))
    train(exp, opt, windows, masks, teacher, generator, rec, stop)
    del opt  # the optimizer's state, before a second copy of the weights is made
    if rc.name == "full":
        cast_parameters(exp.model, exp.dtype)
    else:
        figures["recovery_merged"] = merges(cfg)
        if figures["recovery_merged"]:
            exp.model = merge_lora(exp.model, masks)
    masks.check_weights()
    exp.model.to("cpu").eval()
    return {"seconds": time.perf_counter() - started, **figures}


def train(exp, opt: torch.optim.Optimizer, windows: Tensor, masks: PackedMasks, teacher: Optional[nn.Module],
          generator: torch.Generator, rec: Recorder, stop: StopSignals) -> None:
    """The epochs: every window once an epoch, in batches; each epoch's loss (and its CE and KL
    parts when distilling) recorded."""
    rc = exp.cfg.recovery
    recipe = training_recipe(rc)
    schedule = make_lr_schedule(opt, recipe, recipe.epochs, math.ceil(windows.shape[0] / recipe.batch_size))
    if teacher is not None:
        teacher.to(exp.device)
    exp.model.train()
    step = MixedPrecisionStep(exp.model, opt, masks, exp.dtype, exp.device, teacher, rc.distill, rc.temperature)
    for epoch in range(1, recipe.epochs + 1):
        t, sums = time.perf_counter(), torch.zeros(3, dtype=torch.float64, device=exp.device)
        for idx in torch.randperm(windows.shape[0], generator=generator).split(recipe.batch_size):
            sums += step(windows[idx].to(exp.device)).double() * idx.numel()  # on the device: no sync per step
            stop.check()
        schedule.step()
        masks.check_weights()
        loss, ce, kl = (sums / windows.shape[0]).tolist()
        parts = {"train_ce": ce, "train_kl": kl} if teacher is not None else {}
        rec.epoch("finetune", 1, epoch, recipe.epochs, loss, opt.param_groups[0]["lr"], time.perf_counter() - t,
                  **parts, **step.figures())
    if teacher is not None:
        teacher.to("cpu")


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """The parameters (not the buffers: rotary tables and the like keep the dtype they were
    loaded in) as `dtype`, in place."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)


# ------------------------------------------------------------------------------ the loss
def recovery_loss(logits: Tensor, ids: Tensor, teacher_logits: Optional[Tensor] = None, distill: float = 0.0,
                  temperature: float = 1.0) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss, CE, KL): loss = (1 − distill) · CE + distill · T² · KL, where CE is the next-token
    cross-entropy and KL = Σ_vocab p_t (log p_t − log p_s) of the logits at temperature T (forward
    KL, as Minitron), each averaged over the tokens predicted (every position but a window's last:
    CE and KL over the same tokens). Computed in float32; KL is 0 without a teacher."""
    student = logits[:, :-1].float()
    ce = F.cross_entropy(student.flatten(0, 1), ids[:, 1:].flatten())
    if teacher_logits is None:
        return ce, ce, torch.zeros_like(ce)
    t = temperature
    log_student = F.log_softmax(student / t, dim=-1)
    log_teacher = F.log_softmax(teacher_logits[:, :-1].float() / t, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(-1).mean()
    loss = distill * t * t * kl
    if distill < 1:  # (0 · CE would still turn an infinite CE into a NaN gradient)
        loss = loss + (1 - distill) * ce
    return loss, ce, kl


class MixedPrecisionStep:
    """One optimizer step on a batch of windows: autocast in `dtype` when it is not float32,
    float16's loss scaled (GradScaler: a step whose gradients overflow is skipped and the scale
    halved), the pruned gradients zeroed before the step. With a teacher, its logits (no grad,
    the same autocast) enter the loss (recovery_loss).

    Mixed precision: the optimizer updates float32 master weights (an AdamW step at lr 2e-5 is
    below half a bfloat16 ulp of most weights: it would round away); float16 gets a loss scale
    against underflowing gradients. The masks are held packed, one bit per weight (packed.py)."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, masks: PackedMasks, dtype: torch.dtype,
                 device: torch.device, teacher: Optional[nn.Module] = None, distill: float = 0.0,
                 temperature: float = 1.0):
        self.model, self.opt, self.masks, self.dtype, self.device = model, opt, masks, dtype, device
        self.teacher, self.distill, self.temperature = teacher, distill, temperature
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def __call__(self, ids: Tensor) -> Tensor:
        """The batch's (loss, CE, KL), detached."""
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            logits = self.model(input_ids=ids, use_cache=False).logits
            teacher_logits = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(input_ids=ids, use_cache=False).logits
        loss, ce, kl = recovery_loss(logits, ids, teacher_logits, self.distill, self.temperature)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.masks.zero_grads()
        self.scaler.step(self.opt)
        self.scaler.update()
        return torch.stack([loss, ce, kl]).detach()

    def figures(self) -> Dict:
        """For each epoch's record: float16's loss scale (read once an epoch: reading syncs the device)."""
        return {"loss_scale": self.scaler.get_scale()} if self.scaler.is_enabled() else {}


# ------------------------------------------------------------------------------ LoRA
def lora_targets(model: nn.Module, targets: Optional[List[str]]) -> Tuple[List[str], List[str]]:
    """The full names of the Linear layers and of the fused expert parameters (a mixture of
    experts: peft adapts each expert's matrix) to adapt: every prunable one (targets null), or
    those whose name within a block is or ends with a target (q_proj, self_attn.q_proj, experts.down_proj)."""
    prefix, _ = hub.decoder_blocks(model)
    linears = [name.removesuffix(".weight") for name in hub.block_linears(model)]
    fused = [name for stack in moe.expert_stacks(model) for name in stack.matrix_names()]
    if targets is None:
        return linears, fused
    names = linears + fused
    within = {m: m[len(prefix) + 1:].split(".", 1)[1] for m in names}  # "3.self_attn.q_proj" → "self_attn.q_proj"

    def matches(name: str, target: str) -> bool:
        return within[name] == target or within[name].endswith("." + target)

    unmatched = [t for t in targets if not any(matches(m, t) for m in names)]
    if unmatched:
        raise ConfigError(f"recovery.targets: {', '.join(unmatched)} name no Linear layer or expert weights of the "
                          f"decoder blocks; they hold {', '.join(sorted(set(within.values())))}")
    return ([m for m in linears if any(matches(m, t) for t in targets)],
            [m for m in fused if any(matches(m, t) for t in targets)])


def attach_lora(model: nn.Module, rc) -> nn.Module:
    """The model with LoRA adapters on its targets, everything else frozen. peft keeps the
    adapters in float32 beside half-precision weights: they are the master weights."""
    from peft import LoraConfig, get_peft_model

    modules, fused = lora_targets(model, rc.targets)
    config = LoraConfig(r=rc.rank, lora_alpha=rc.alpha, lora_dropout=rc.dropout, target_modules=modules,
                        target_parameters=fused or None, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config, autocast_adapter_dtype=True)


def adapter_optimizer(model: nn.Module, rc) -> torch.optim.Optimizer:
    """AdamW over the adapters alone (the frozen weights hold no optimizer state)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=rc.lr, weight_decay=rc.weight_decay, fused=True)


def lora_figures(model: nn.Module, rc) -> Dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    return {"recovery_rank": rc.rank, "recovery_alpha": rc.alpha, "recovery_trainable_params": trainable,
            "recovery_adapted_layers": layers}


def merges(cfg) -> bool:
    """recovery.merge, or when null: merge when the weights left are dense (structured or no pruning)."""
    if cfg.recovery.merge is not None:
        return cfg.recovery.merge
    return cfg.sparsity == 0 or cfg.granularity.name in LM_STRUCTURES  # structures removed: the rest is dense


def merge_lora(model: nn.Module, masks: PackedMasks) -> nn.Module:
    """The plain transformers model with W + (alpha/r)·B·A in place of each adapted W. A merge adds
    a dense product, so the weights that were exactly 0 before (padding of a structured pruning,
    or the rare exact zero of a dense model) are set back to 0: they stay what they were."""
    merged = model.merge_and_unload()
    with torch.no_grad():
        for name, p in masks.params.items():
            p.masked_fill_(masks.pruned(name), 0)
    return merged


def save_adapter(model: nn.Module, path: Path) -> nn.Module:
    """An unmerged LoRA model: its adapter saved to `path` in peft's format (PeftModel.from_pretrained
    loads it on the saved pruned model), and the pruned model without the adapters returned.
    Any other model: returned as it is."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    model.save_pretrained(path)
    return model.unload()
