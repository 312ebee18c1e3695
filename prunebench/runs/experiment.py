"""The built run: every piece a run needs (device, data, model, masks, criterion, granularity,
the targets of its rounds, its memory budget) and every check that can refuse the configuration,
before any training; its records (and wandb)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ..config import Config, ConfigError
from ..core import distributed
from ..core.allocation import layer_rate_targets, stage_targets
from ..core.device import configure_backends, gib, memory_budget, resolve_device
from ..core.granularity import Granularity, build_granularity
from ..core.masks import Masks
from ..core.metrics import MacCount, count_macs
from ..core.select import SelectOptions, Target, check_exclusions, check_reachable, layers_in_scope
from ..criteria import Criterion, build_criterion
from ..data import TensorData, build_dataset
from ..models import build_model
from ..retrain import check_policy
from .record import Recorder


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Experiment:
    """The built pieces of a run, before any training."""

    cfg: Config
    device: torch.device
    data: TensorData
    model: nn.Module
    new_model: Callable[[], nn.Module]  # a freshly initialised model of the same architecture
    masks: Masks
    criterion: Criterion
    granularity: Granularity
    # sparsity after each round (None: the criterion decides; a tuple: one ratio per stage; a
    # dict: one sparsity per layer)
    targets: List[Optional[Target]]
    macs: MacCount  # the dense model's multiply-accumulates per example
    memory: int  # bytes that curvature estimates may hold at once
    schedule: object  # the Schedule (schedules/) that runs it


def build(cfg: Config, schedule) -> Experiment:
    """Every piece of the run, and every check that can refuse the configuration, before any
    training. `schedule`: the run's Schedule (schedules/), whose own checks run here too."""
    device = resolve_device(cfg.device)
    configure_backends(cfg.deterministic, cfg.tf32)  # before any CUDA work (cuBLAS reads its workspace once)
    criterion = build_criterion(cfg.criterion)
    check_policy(cfg.retrain)
    granularity = build_granularity(cfg.granularity)
    check_granularity(cfg, criterion, granularity)
    if criterion.changes_architecture and (cfg.retrain.name != "retain" or len(cfg.schedule.targets(
            cfg.sparsity)) > 1):
        raise ConfigError(f"criterion={cfg.criterion.name} prunes a reparameterised network once: it needs "
                          f"schedule=oneshot and retrain=retain (got {cfg.schedule.name}, {cfg.retrain.name})")
    if granularity.name != "unstructured" and cfg.criterion.sanity == "shuffle":
        raise ConfigError("criterion.sanity=shuffle places single weights anywhere in a layer; with granularity="
                          f"{granularity.name} use sanity=invert or none")
    data = build_dataset(cfg.dataset, cfg.data_dir).to(device)
    check_distributed(cfg, schedule, data, device)

    def new_model() -> nn.Module:
        model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
        if cfg.train.sync_bn and distributed.world().distributed:  # statistics over the global batch
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model.to(memory_format=torch.channels_last) if cfg.train.channels_last else model

    seed_everything(cfg.seed)
    model = new_model()
    if cfg.model.checkpoint:
        load_checkpoint(model, cfg.model.checkpoint)
    masks = Masks.ones(model, biases=cfg.model.prune_biases, norm=cfg.model.prune_norm)
    granularity.bind(model, data.input_shape)  # structured: which units exist, what they own
    criterion.validate(model, masks)
    memory = check_memory(cfg, criterion, model, masks, data.num_classes, device)
    schedule.check(cfg, criterion, granularity, masks, data)
    if criterion.calibrates or cfg.calibration.layer_errors:
        check_calibration(cfg, data)
    targets = plan_targets(cfg, criterion, granularity, masks)
    macs = count_macs(model, data.input_shape)
    return Experiment(cfg, device, data, model, new_model, masks, criterion, granularity, targets, macs, memory,
                      schedule)


def check_distributed(cfg: Config, schedule, data, device: torch.device) -> None:
    """What a run over several processes can do (distributed.py), refused before any training."""
    ranks = distributed.world().size
    if ranks == 1:
        return
    if cfg.train.sync_bn and device.type != "cuda":
        raise ConfigError("train.sync_bn needs GPUs (SyncBatchNorm runs only on CUDA): on CPUs each rank's batch "
                          "norm sees its own shard of the global batch (train.sync_bn=false)")
    if not schedule.multi_process:
        raise ConfigError(f"schedule={cfg.schedule.name} changes masks inside training from each step's batch; "
                          f"it does not run over several processes yet (run it with one process)")
    batch, n = cfg.train.batch_size, data.num_examples("train")
    if batch % ranks:
        raise ConfigError(f"train.batch_size={batch} (the global batch) does not split into {ranks} equal shards: "
                          f"use a multiple of {ranks}")
    if 0 < n % batch < ranks:
        raise ConfigError(f"the last batch of an epoch holds {n % batch} examples, fewer than the {ranks} processes: "
                          f"choose train.batch_size so that {n} examples leave none or at least {ranks}")


def check_granularity(cfg: Config, criterion: Criterion, granularity: Granularity) -> None:
    if granularity.name not in criterion.granularities:
        raise ConfigError(f"criterion={cfg.criterion.name} prunes with granularity "
                          f"{' or '.join(criterion.granularities)}, not granularity={granularity.name}")


def check_memory(cfg: Config, criterion: Criterion, model: nn.Module, masks: Masks, num_classes: int,
                 device: torch.device) -> int:
    """The memory budget of curvature estimates, refused when the criterion's least need exceeds it."""
    budget = memory_budget(cfg.curvature.memory_gb, device)
    need = criterion.memory_need(model, masks, num_classes)
    if need is not None and need[0] > budget:
        source = (f"curvature.memory_gb={cfg.curvature.memory_gb}" if cfg.curvature.memory_gb is not None
                  else f"80% of the memory free on {device} now")
        raise ConfigError(f"criterion={cfg.criterion.name} needs about {gib(need[0])} at once for {need[1]}, more "
                          f"than the budget of {gib(budget)} ({source}); use a smaller model or criterion "
                          f"options, or a device with more memory (curvature.memory_gb sets the budget)")
    return budget


def check_calibration(cfg: Config, data) -> None:
    """The calibration split exists and holds calibration.samples examples."""
    cal = cfg.calibration
    have = data.num_examples(cal.source)
    if have == 0:
        raise ConfigError(f"calibration.source={cal.source}: dataset={cfg.dataset.name} has no {cal.source} split "
                          f"(dataset.val_size sets one aside from the training data)")
    if cal.samples > have:
        raise ConfigError(f"calibration.samples={cal.samples} is more than the {have} examples of the "
                          f"{cal.source} split")


def plan_targets(cfg: Config, criterion: Criterion, granularity: Granularity, masks: Masks) -> List[Optional[Target]]:
    """What each round prunes to, checked reachable before any training."""
    targets: List[Optional[Target]] = list(cfg.schedule.targets(cfg.sparsity))
    if cfg.criterion.scope == "stage":  # one ratio per stage, each on the schedule's rounds
        if not granularity.structured:
            raise ConfigError("criterion.scope=stage needs granularity=filter or channel")
        ratios = cfg.criterion.stage_ratios or [cfg.sparsity] * granularity.structure.stage_count
        targets = stage_targets(ratios, cfg.schedule.targets)
    if cfg.criterion.layer_rates:  # per-layer rates on the schedule's rounds (LTH)
        if not criterion.layer_targets:
            raise ConfigError(f"criterion={cfg.criterion.name} cannot take a sparsity per layer "
                              f"(criterion.layer_rates)")
        targets = layer_rate_targets(cfg.criterion.layer_rates, cfg.schedule.rate, len(targets), masks)
    opts = SelectOptions.of(cfg.criterion)
    if criterion.sets_own_sparsity:
        check_exclusions(masks, opts)
        if not layers_in_scope(masks, opts, granularity):
            raise ConfigError("every prunable layer is excluded (criterion.exclude_first/exclude_last/exclude)")
        return [None] * len(targets)
    granularity.check_plan(targets, masks)
    check_reachable(targets[-1], masks, opts, granularity)
    return targets


def load_checkpoint(model: nn.Module, path: str) -> None:
    """A trained state_dict over the fresh model: tensors only (no pickled code), every key matching."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"model.checkpoint={path}: no such file") from None
    except Exception as e:
        raise ConfigError(f"model.checkpoint={path} is not a state_dict file torch can load safely: {e}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"model.checkpoint={path} does not fit model={type(model).__name__}: "
                          f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None


def make_recorder(cfg: Config, exp: Experiment, out_dir: Path, group: Optional[str], config: Dict,
                  saved: Optional[Dict]) -> Recorder:
    """The run's records (and wandb, when asked), resumed from the checkpoint's."""
    records = saved["records"] if saved else None
    wandb_state = (records.get("sinks") or [None])[0] if records else None  # resumed: the same wandb run
    sinks = logger_sinks(cfg, out_dir, group, config, wandb_state)
    title = (f"{cfg.criterion.name} · {cfg.model.name} · {cfg.dataset.name} · {cfg.retrain.name} · "
             f"{cfg.schedule.name} · seed {cfg.seed}")
    finetunes = 1 if cfg.schedule.inside_training else len(exp.targets)
    epochs = cfg.train.pretrain_epochs + finetunes * cfg.train.finetune_epochs
    rec = Recorder(out_dir, title, epochs, sinks, resume=records)
    if saved:
        rec.event("resumed", where=saved["where"])
    return rec


def logger_sinks(cfg: Config, out_dir: Path, group: Optional[str], config: Dict, resume: Optional[Dict]) -> List:
    """Where the run is mirrored besides its directory: wandb when logger=wandb (from rank 0 only)."""
    if cfg.logger.name != "wandb" or not distributed.world().main:
        return []
    from .wandb_logger import WandbLogger

    return [WandbLogger(cfg.logger, config, out_dir, name=out_dir.name, group=group, job_type=cfg.criterion.name,
                        resume=resume)]
