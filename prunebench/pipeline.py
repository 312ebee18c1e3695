"""The experiment: build → pretrain → rounds of (score → select → mask → retrain policy → finetune).

Read top to bottom, `run` is the recipe of a pruning paper. Everything that can reject the
configuration (names, ranges, a missing dataset, an unreachable sparsity) happens in `build`,
before any training; summary.json is written only when the last round is done.
"""

from __future__ import annotations

import fcntl
import json
import logging
import random
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from . import __version__
from .core import distributed
from .runs.checkpoint import FILE as CHECKPOINT_FILE
from .runs.checkpoint import CheckpointError, Progress, RunCheckpoints, StopSignals, check_same_config, read_json
from .runs.checkpoint import load as load_checkpoint_file
from .config import Config, ConfigError, DynamicConfig, GradualConfig, round_targets, to_plain
from .criteria import Criterion, build_criterion
from .data import TensorData, build_dataset
from .core.device import configure_backends, gib, memory_budget, resolve_device
from .schedules.dynamic import check_dynamic, train_sparse
from .schedules.gradual import check_gradual, train_while_pruning
from .core.granularity import Granularity, build_granularity
from .core.masks import Masks
from .core.metrics import MacCount, count_macs
from .models import build_model
from .runs.record import Recorder
from .retrain import check_policy, snapshot
from .schedules.rounds import pretrain, prune_rounds
from .core.select import SelectOptions, Target, check_exclusions, check_reachable, layers_in_scope
from .runs.state import RunState
from .training.loop import Diverged

log = logging.getLogger("prunebench")


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


def build(cfg: Config) -> Experiment:
    device = resolve_device(cfg.device)
    configure_backends(cfg.deterministic, cfg.tf32)  # before any CUDA work (cuBLAS reads its workspace once)
    criterion = build_criterion(cfg.criterion)
    check_policy(cfg.retrain)
    granularity = build_granularity(cfg.granularity)
    check_granularity(cfg, criterion, granularity)
    if criterion.changes_architecture and (cfg.retrain.name != "retain" or len(round_targets(
            cfg.schedule, cfg.sparsity)) > 1):
        raise ConfigError(f"criterion={cfg.criterion.name} prunes a reparameterised network once: it needs "
                          f"schedule=oneshot and retrain=retain (got {cfg.schedule.name}, {cfg.retrain.name})")
    if granularity.name != "unstructured" and cfg.criterion.sanity == "shuffle":
        raise ConfigError("criterion.sanity=shuffle places single weights anywhere in a layer; with granularity="
                          f"{granularity.name} use sanity=invert or none")
    data = build_dataset(cfg.dataset, cfg.data_dir).to(device)
    check_distributed(cfg, data, device)

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
    if isinstance(cfg.schedule, GradualConfig):
        check_gradual(cfg, criterion, data)
    if isinstance(cfg.schedule, DynamicConfig):
        check_dynamic(cfg, criterion, granularity, masks)
    if criterion.calibrates or cfg.calibration.layer_errors:
        check_calibration(cfg, data)
    targets = plan_targets(cfg, criterion, granularity, masks)
    macs = count_macs(model, data.input_shape)
    return Experiment(cfg, device, data, model, new_model, masks, criterion, granularity, targets, macs, memory)


def check_distributed(cfg: Config, data, device: torch.device) -> None:
    """What a run over several processes can do (distributed.py), refused before any training."""
    ranks = distributed.world().size
    if ranks == 1:
        return
    if cfg.train.sync_bn and device.type != "cuda":
        raise ConfigError("train.sync_bn needs GPUs (SyncBatchNorm runs only on CUDA): on CPUs each rank's batch "
                          "norm sees its own shard of the global batch (train.sync_bn=false)")
    if isinstance(cfg.schedule, (GradualConfig, DynamicConfig)):
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
    targets: List[Optional[Target]] = list(round_targets(cfg.schedule, cfg.sparsity))
    if cfg.criterion.scope == "stage":  # one ratio per stage, each on the schedule's rounds
        if not granularity.structured:
            raise ConfigError("criterion.scope=stage needs granularity=filter or channel")
        ratios = cfg.criterion.stage_ratios or [cfg.sparsity] * granularity.structure.stage_count
        per_stage = [round_targets(cfg.schedule, p) for p in ratios]
        targets = [tuple(stage[r] for stage in per_stage) for r in range(len(targets))]
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


def layer_rate_targets(rates: Dict[str, float], default: float, rounds: int, masks: Masks) -> List[Dict[str, float]]:
    """Sparsity of each layer after each round when round r removes rate_l of what remains."""
    modules = [n.rpartition(".")[0] for n in masks]
    unmatched = [k for k in rates if not any(m.startswith(k) for m in modules)]
    if unmatched:
        raise ConfigError(f"criterion.layer_rates keys match no prunable layer: {', '.join(unmatched)} "
                          f"(layers: {', '.join(modules)})")

    def rate(module: str) -> float:
        keys = [k for k in rates if module.startswith(k)]
        return rates[max(keys, key=len)] if keys else default

    return [{n: 1.0 - (1.0 - rate(n.rpartition(".")[0])) ** r for n in masks} for r in range(1, rounds + 1)]


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


def run(cfg: Config, out_dir: Path | str, group: Optional[str] = None) -> Dict:
    """The whole experiment into `out_dir`; `group` names the sweep it belongs to (for wandb).

    A directory that holds this configuration's finished run is reported, not run again; one that
    holds its checkpoint resumes from it (checkpoint.py)."""
    out_dir = Path(out_dir)
    rank = distributed.world()
    if rank.distributed and cfg.model.task == "causal_lm":
        raise ConfigError("model=hf_causal_lm prunes block by block in one process (one block on the device at a "
                          "time); run it without torchrun")
    # only rank 0 writes the run directory; the others write what they must into a private one
    write_dir = out_dir if rank.main else Path(tempfile.mkdtemp(prefix=f"prunebench-rank{rank.rank}-"))
    try:
        with run_directory(write_dir):  # one process per run directory
            config = to_plain(cfg)
            finished = finished_run(out_dir, config) if cfg.checkpoint.resume else None
            saved = saved_checkpoint(out_dir, config) if cfg.checkpoint.resume and finished is None else None
            if saved and not rank.main:  # its records go on from rank 0's, in its own directory
                shutil.copy(out_dir / "metrics.jsonl", write_dir / "metrics.jsonl")
            distributed.barrier()  # every rank has read the checkpoint before rank 0 may remove it
            if rank.main and (not cfg.checkpoint.resume or (finished is not None and not cfg.checkpoint.keep)):
                discard_checkpoint(cfg, out_dir)  # start over; or a finished run's leftover
            if finished is not None:
                return finished
            with StopSignals() as stop:
                if cfg.model.task == "causal_lm":  # the language-model recipe (SparseGPT, Wanda)
                    from .lm.recipe import run_language_model

                    return run_language_model(cfg, out_dir, group, config, stop)
                return _run(cfg, write_dir, group, config, saved, stop)
    finally:
        if not rank.main:
            shutil.rmtree(write_dir, ignore_errors=True)


def discard_checkpoint(cfg: Config, out_dir: Path) -> None:
    if cfg.model.task == "causal_lm":  # checkpoint.pt and the finished blocks' files
        from .lm.resume import discard

        discard(out_dir)
    else:
        (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)


def _run(cfg: Config, out_dir: Path, group: Optional[str], config: Dict, saved: Optional[Dict],
         stop: StopSignals) -> Dict:
    started = time.perf_counter() - (saved["seconds"] if saved else 0.0)  # a resumed run counts its past
    exp = build(cfg)
    rec = make_recorder(cfg, exp, out_dir, group, config, saved)
    data_order = torch.Generator().manual_seed(cfg.seed)
    score_rng = torch.Generator().manual_seed(cfg.seed + 1)
    init_state = snapshot(exp.model)
    progress = Progress(exp.model, exp.masks, init_state, init_state)
    checkpoints = RunCheckpoints(out_dir, config, cfg.checkpoint.every_epochs, rec,
                                 {"data_order": data_order, "score": score_rng}, stop, started, str(exp.device))
    run = RunState(cfg, exp, rec, progress, checkpoints, stop, data_order, score_rng, saved)
    try:
        if saved:
            checkpoints.restore(saved, progress, exp.new_model)
        resumed_round = saved["round"] if saved else None  # the state of the phase it stopped in
        if isinstance(cfg.schedule, GradualConfig):  # pruning inside one training run
            compact = train_while_pruning(run, resumed_round)
        elif isinstance(cfg.schedule, DynamicConfig):  # sparse from the start, masks that move
            compact = train_sparse(run, resumed_round)
        else:  # between training phases
            pretrain(run)
            compact = prune_rounds(run, resumed_round)
        rec.save_weights(run.model, progress.masks)
        if compact is not None:
            rec.save_compact(compact, exp.data.input_shape)
        summary = rec.finish({"status": "completed", **summary_fields(run, started, config, rec.rounds[-1]),
                              "file_bytes": rec.file_bytes()})
    except Diverged as e:
        # the run ends here, marked as such; a sweep's other jobs go on
        log.error(f"diverged in {run.stage}: {e}; the run stops (summary.json: status diverged)")
        summary = rec.finish_diverged({"status": "diverged", "diverged": {"stage": run.stage, "message": str(e)},
                                       **summary_fields(run, started, config, None)})
    finally:
        rec.close()
    if not cfg.checkpoint.keep:  # the run is finished: its summary.json says so
        checkpoints.remove()
    return summary


def make_recorder(cfg: Config, exp: Experiment, out_dir: Path, group: Optional[str], config: Dict,
                  saved: Optional[Dict]) -> Recorder:
    """The run's records (and wandb, when asked), resumed from the checkpoint's."""
    records = saved["records"] if saved else None
    wandb_state = (records.get("sinks") or [None])[0] if records else None  # resumed: the same wandb run
    sinks = logger_sinks(cfg, out_dir, group, config, wandb_state)
    title = (f"{cfg.criterion.name} · {cfg.model.name} · {cfg.dataset.name} · {cfg.retrain.name} · "
             f"{cfg.schedule.name} · seed {cfg.seed}")
    finetunes = 1 if isinstance(cfg.schedule, (GradualConfig, DynamicConfig)) else len(exp.targets)
    epochs = cfg.train.pretrain_epochs + finetunes * cfg.train.finetune_epochs
    rec = Recorder(out_dir, title, epochs, sinks, resume=records)
    if saved:
        rec.event("resumed", where=saved["where"])
    return rec


def logger_sinks(cfg: Config, out_dir: Path, group: Optional[str], config: Dict, resume: Optional[Dict]) -> List:
    """Where the run is mirrored besides its directory: wandb when logger=wandb (from rank 0 only)."""
    if cfg.logger.name != "wandb" or not distributed.world().main:
        return []
    from .runs.wandb_logger import WandbLogger

    return [WandbLogger(cfg.logger, config, out_dir, name=out_dir.name, group=group, job_type=cfg.criterion.name,
                        resume=resume)]


def summary_fields(run: RunState, started: float, config: Dict, final: Optional[Dict]) -> Dict:
    """summary.json, whatever the run's outcome: the rounds so far, and the dense network's
    figures once it is trained."""
    cfg, exp, rec = run.cfg, run.exp, run.rec
    dense = rec.dense
    completed = "params_total" in dense  # pretrained
    return {
        "criterion": cfg.criterion.name, "model": cfg.model.name, "dataset": cfg.dataset.name,
        **({"retrain": cfg.retrain.name, "schedule": cfg.schedule.name,
            "sparsity_requested": None if (exp.criterion.sets_own_sparsity or cfg.criterion.scope == "stage"
                                           or cfg.criterion.layer_rates) else cfg.sparsity} if completed else {}),
        "seed": cfg.seed,
        **({"device": str(exp.device), "threads": torch.get_num_threads(), "processes": distributed.world().size,
            "params_total": dense["params_total"], "prunable_total": dense["prunable_total"]} if completed else {}),
        "dense_test_acc": dense.get("test_acc"),
        **({"dense_test_loss": dense["test_loss"], "flops": dense["flops"],
            **({"dense_val_acc": dense["val_acc"]} if "val_acc" in dense else {}),
            **({"dense_at_step": dense["at_step"]} if "at_step" in dense else {}),
            "test_examples": exp.data.num_examples("test")} if completed else {}),
        **({"granularity": exp.granularity.describe(run.progress.masks)} if exp.granularity.local else {}),
        "rounds": rec.rounds, "final": final,
        "seconds_total": time.perf_counter() - started,
        "versions": versions(exp.device),
        "config": config,
    }


def versions(device: torch.device) -> Dict[str, str]:
    """What moves a number besides the config: library versions, and on a GPU its name and CUDA's."""
    out = {"prunebench": __version__, "torch": torch.__version__}
    if device.type == "cuda":
        out.update(cuda=str(torch.version.cuda), cudnn=str(torch.backends.cudnn.version()),
                   gpu=torch.cuda.get_device_name(device))
    return out


# ------------------------------------------------------------------------------ resuming
@contextmanager
def run_directory(out_dir: Path):
    """Hold the run directory's lock: two processes never write into one directory."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = open(out_dir / ".lock", "a")
    except OSError as e:
        raise CheckpointError(f"cannot write into the run directory {out_dir}: {e.strerror or e}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused = None
    except OSError:
        refused = (f"another prunebench process is running in {out_dir}; give this run its own directory "
                   f"(hydra.run.dir=...)")
    refused = distributed.from_main(refused)  # every rank stops when rank 0's directory is taken
    if refused is not None:
        lock.close()
        raise CheckpointError(refused)
    try:
        yield
    finally:
        lock.close()  # releases the lock (so does the process's death)


def finished_run(out_dir: Path, config: Dict) -> Optional[Dict]:
    """The summary of this configuration's run if the directory holds it finished (completed or
    diverged), reported and not run again; another configuration's is refused."""
    summary = read_json(out_dir / "summary.json")
    if summary is None:
        return None
    check_same_config(f"{out_dir} holds a finished run", summary.get("config", {}), config)
    final = summary.get("final") or {}
    log.info(f"{out_dir} already holds this run, {summary.get('status')}"
             + (f": sparsity {final['sparsity']:.4f}, " + (f"test ppl {final['test_ppl']:.3f}" if "test_ppl" in final
                                                           else f"test acc {final['test_acc']:.4f}") if final else "")
             + "; not run again (checkpoint.resume=false runs it over)")
    return summary


def saved_checkpoint(out_dir: Path, config: Dict) -> Optional[Dict]:
    path = out_dir / CHECKPOINT_FILE
    if not path.exists():
        return None
    saved = load_checkpoint_file(path)
    check_same_config(f"{path} is a checkpoint", json.loads(saved["config"]), config)
    log.info(f"resuming from {path} (saved at {saved['where']})")
    return saved
