"""The experiment: build → pretrain → rounds of (score → select → mask → retrain policy → finetune).

Read top to bottom, `run` is the recipe of a pruning paper. Everything that can reject the
configuration (names, ranges, a missing dataset, an unreachable sparsity) happens in `build`,
before any training; summary.json is written only when the last round is done.
"""

from __future__ import annotations

import copy
import fcntl
import json
import logging
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from . import __version__
from .checkpoint import FILE as CHECKPOINT_FILE
from .checkpoint import (CheckpointError, Progress, RunCheckpoints, StopSignals, check_same_config, read_json,
                         set_rng_state, to_device)
from .checkpoint import load as load_checkpoint_file
from .config import Config, ConfigError, finetune_recipe, round_targets, to_plain
from .criteria import Criterion, ScoreContext, build_criterion
from .data import TensorData, build_dataset
from .device import configure_backends, exact_fp32, gib, memory_budget, resolve_device, seeded
from .granularity import Granularity, build_granularity
from .masks import Masks, prunable_weights
from .metrics import MacCount, count_macs, weight_stats
from .models import build_model
from .record import Recorder
from .retrain import apply_policy, snapshot
from .select import SelectOptions, Target, check_exclusions, check_reachable, layers_in_scope
from .structure import compare_latency, count_params, expand_into
from .train import Diverged, EvalResult, FitState, evaluate, fit

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
    granularity = build_granularity(cfg.granularity)
    if granularity.name not in criterion.granularities:
        raise ConfigError(f"criterion={cfg.criterion.name} prunes with granularity "
                          f"{' or '.join(criterion.granularities)}, not granularity={granularity.name}")
    if criterion.changes_architecture and (cfg.retrain.name != "retain" or len(round_targets(
            cfg.schedule, cfg.sparsity)) > 1):
        raise ConfigError(f"criterion={cfg.criterion.name} prunes a reparameterised network once: it needs "
                          f"schedule=oneshot and retrain=retain (got {cfg.schedule.name}, {cfg.retrain.name})")
    if granularity.structured and cfg.criterion.sanity == "shuffle":
        raise ConfigError("criterion.sanity=shuffle places single weights; with granularity="
                          f"{granularity.name} use sanity=invert or none")
    data = build_dataset(cfg.dataset, cfg.data_dir).to(device)

    def new_model() -> nn.Module:
        model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
        return model.to(memory_format=torch.channels_last) if cfg.train.channels_last else model

    seed_everything(cfg.seed)
    model = new_model()
    if cfg.model.checkpoint:
        load_checkpoint(model, cfg.model.checkpoint)
    masks = Masks.ones(model, biases=cfg.model.prune_biases, norm=cfg.model.prune_norm)
    granularity.bind(model, data.input_shape)  # structured: which units exist, what they own
    criterion.validate(model, masks)
    memory = check_memory(cfg, criterion, model, masks, data.num_classes, device)
    targets = plan_targets(cfg, criterion, granularity, masks)
    macs = count_macs(model, data.input_shape)
    return Experiment(cfg, device, data, model, new_model, masks, criterion, granularity, targets, macs, memory)


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
    with run_directory(out_dir):  # one process per run directory
        config = to_plain(cfg)
        saved = None
        if cfg.checkpoint.resume:
            finished = finished_run(out_dir, config)
            if finished is not None:
                if not cfg.checkpoint.keep:  # killed between its summary and this cleanup
                    (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
                return finished
            saved = saved_checkpoint(out_dir, config)
        else:
            (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
        with StopSignals() as stop:
            return _run(cfg, out_dir, group, config, saved, stop)


def _run(cfg: Config, out_dir: Path, group: Optional[str], config: Dict, saved: Optional[Dict],
         stop: StopSignals) -> Dict:
    started = time.perf_counter() - (saved["seconds"] if saved else 0.0)  # a resumed run counts its past
    exp = build(cfg)
    model, data, train = exp.model, exp.data, cfg.train
    title = (f"{cfg.criterion.name} · {cfg.model.name} · {cfg.dataset.name} · {cfg.retrain.name} · "
             f"{cfg.schedule.name} · seed {cfg.seed}")
    records = saved["records"] if saved else None
    sinks = []
    if cfg.logger.name == "wandb":
        from .wandb_logger import WandbLogger

        wandb_state = (records.get("sinks") or [None])[0] if records else None  # resumed: the same wandb run
        sinks.append(WandbLogger(cfg.logger, config, out_dir, name=out_dir.name, group=group,
                                 job_type=cfg.criterion.name, resume=wandb_state))
    rec = Recorder(out_dir, title, train.pretrain_epochs + len(exp.targets) * train.finetune_epochs, sinks,
                   resume=records)
    if saved:
        rec.event("resumed", where=saved["where"])
    stage = "pretraining"  # where the run is, for a divergence report
    try:
        # separate streams, so changing one choice (say, the criterion) leaves the others' draws alone
        data_order = torch.Generator().manual_seed(cfg.seed)
        score_rng = torch.Generator().manual_seed(cfg.seed + 1)
        structured = exp.granularity.structured

        # what the run has done; a checkpoint saves it and a resumed run starts from it
        init_state = snapshot(model)
        progress = Progress(model, exp.masks, init_state, init_state)
        checkpoints = RunCheckpoints(out_dir, config, cfg.checkpoint.every_epochs, rec,
                                     {"data_order": data_order, "score": score_rng}, stop, started, str(exp.device))
        # EigenDamage's rewritten network cannot be rebuilt from a state_dict: its round is redone
        can_checkpoint_rounds = not exp.criterion.changes_architecture
        resumed_round = restore(saved, exp, progress, checkpoints) if saved else None
        model, init_state = progress.model, progress.init_state

        has_val = data.num_examples("val") > 0

        def test(net: Optional[nn.Module] = None):
            return evaluate(net or model, data.eval_batches("test", train.eval_batch_size), train.precision,
                            train.channels_last)

        def val(net: Optional[nn.Module] = None):
            """Validation metrics (those a researcher may tune on), empty without a split."""
            if not has_val:
                return {}
            v = evaluate(net or model, data.eval_batches("val", train.eval_batch_size), train.precision,
                         train.channels_last)
            return {"val_acc": v.accuracy, "val_loss": v.loss}

        def logger(phase: str, round: int, epochs: int, net: Optional[nn.Module] = None):
            def on_epoch_end(res):
                t = test(net) if train.eval_every_epoch else None
                rec.epoch(phase, round, res.epoch, epochs, res.train_loss, res.lr, res.seconds,
                          t.accuracy if t else None, t.loss if t else None,
                          **(val(net) if train.eval_every_epoch else {}))
            return on_epoch_end

        # ---- pretrain: θ0 → θ*, keeping θ0 and the rewind point
        if progress.rounds_done < 0:
            pretrain_log = logger("pretrain", 0, train.pretrain_epochs)

            def on_pretrain_epoch(res):
                if cfg.retrain.name == "rewind" and res.epoch == cfg.retrain.rewind_epoch:
                    progress.rewind_state = snapshot(model)
                pretrain_log(res)

            fit(model, data, train, train.pretrain_epochs, train.lr, data_order, on_epoch_end=on_pretrain_epoch,
                checkpoints=checkpoints.phase("pretrain", progress), resume=fit_state(saved))
            dense = test()
            rec.record_dense(dense.accuracy, dense.loss, weight_stats(model, exp.masks, exp.macs), **val())
            # structured: the dense network, to time against each round's compacted one
            if structured and cfg.latency.repeats:
                progress.dense_model = copy.deepcopy(model).eval()
            progress.rounds_done = 0
            checkpoints.save("pretrained", progress)
            stop.check()
        dense_model = progress.dense_model

        # ---- pruning rounds
        finetune = finetune_recipe(train)
        masks, macs = progress.masks, exp.macs
        compact = None
        for r, target in enumerate(exp.targets, 1):
            if r <= progress.rounds_done:
                continue
            stage = f"round {r}"
            t0 = time.perf_counter()
            if resumed_round is None:  # score, select, mask, then the retrain policy
                ctx = ScoreContext(model, masks, round=r, rounds=len(exp.targets), init_state=init_state,
                                   batches=lambda: data.train_batches(train.batch_size, score_rng),
                                   generator=score_rng, input_shape=data.input_shape,
                                   num_classes=data.num_classes, memory=exp.memory)
                step = prune_step(exp, ctx, target)
                model, masks, enforced = step.model, step.masks, step.enforced
                progress.model, progress.masks = model, masks
                macs = step.macs or macs
                score_seconds = time.perf_counter() - t0
                pruned = test()  # after pruning, before retraining

                t1 = time.perf_counter()
                diagnostics = apply_policy(cfg.retrain, model, masks, init_state=init_state,
                                           rewind_state=progress.rewind_state,
                                           fresh_model=lambda: fresh_model(exp, cfg.seed, r))
                compensation = step.compensation
                if structured:
                    # fine-tune the physically smaller network, then write it back into the masked one
                    enforced.apply(model)
                    compact = exp.granularity.structure.compact(model, masks, data.input_shape)
                    if train.channels_last:
                        compact = compact.to(memory_format=torch.channels_last)
                resume_finetune = None
            else:  # stopped while fine-tuning this round: its pruning is in the checkpoint
                masks, enforced, compact = progress.masks, with_coupled(progress.masks, exp.granularity, model), \
                    resumed_round["compact"]
                pruned = EvalResult(*resumed_round["pruned"])
                score_seconds, diagnostics = resumed_round["score_seconds"], resumed_round["diagnostics"]
                compensation = resumed_round["compensation"]
                t1 = time.perf_counter() - resumed_round["train_seconds"]
                resume_finetune, resumed_round = fit_state(saved), None

            def round_state() -> Dict:
                return {"pruned": [pruned.accuracy, pruned.loss, pruned.correct, pruned.total],
                        "score_seconds": score_seconds,
                        # plain JSON values: a checkpoint loads nothing else (weights_only)
                        "diagnostics": json.loads(json.dumps(diagnostics)),
                        "compensation": json.loads(json.dumps(compensation)),
                        "train_seconds": time.perf_counter() - t1,
                        "compact": compact.state_dict() if compact is not None else None}

            during_finetune = checkpoints.phase(f"round {r} finetune", progress, round_state,
                                                savable=can_checkpoint_rounds)
            if structured:
                fit(compact, data, finetune, train.finetune_epochs, finetune.lr, data_order,
                    on_epoch_end=logger("finetune", r, train.finetune_epochs, compact),
                    checkpoints=during_finetune, resume=resume_finetune)
                expand_into(exp.granularity.structure, model, compact, masks)
            else:
                fit(model, data, finetune, train.finetune_epochs, finetune.lr, data_order,
                    masks=enforced, on_epoch_end=logger("finetune", r, train.finetune_epochs),
                    checkpoints=during_finetune, resume=resume_finetune)
            train_seconds = time.perf_counter() - t1
            final = test()

            enforced.bind(model).check_weights()  # the saved numbers are those of a truly pruned net
            stats = weight_stats(model, masks, macs)
            empty = [s.layer for s in stats.layers if s.nonzero == 0]
            if empty:
                log.warning(f"round {r}: layers emptied by pruning: {', '.join(empty)} "
                            f"(set criterion.min_density to prevent it)")
            row = {
                "round": r, "target_sparsity": target if isinstance(target, float) else None,
                **({"target_stage_ratios": list(target)} if isinstance(target, tuple) else {}),
                **({"target_layer_sparsity": target} if isinstance(target, dict) else {}),
                "sparsity": stats.sparsity,
                "compression": stats.compression, "params_remaining": stats.params_nonzero,
                "prunable_remaining": stats.prunable_nonzero,
                "flops": exp.macs.total, "flops_remaining": stats.flops_remaining,
                "test_acc_pruned": pruned.accuracy, "test_loss_pruned": pruned.loss,
                "test_acc": final.accuracy, "test_loss": final.loss, **val(),
                "score_seconds": score_seconds, "train_seconds": train_seconds,
                "empty_layers": empty, **compensation,
                **({cfg.retrain.name: diagnostics} if diagnostics else {}),
            }
            if structured:
                check_compact(compact, model, data)
                row["units_removed"] = units_removed(exp.granularity, masks)
                row.update(compact_size(compact, data.input_shape, cfg, rec.dense, exp.macs))
                if dense_model is not None:
                    lat = cfg.latency
                    row.update(compare_latency(dense_model, compact, data.input_shape, lat.batch_sizes,
                                               lat.repeats, lat.warmup, train.precision, train.channels_last))
            rec.record_round(row, stats)
            progress.rounds_done = r
            if can_checkpoint_rounds:
                checkpoints.save(f"round {r}", progress)
            stop.check()

        if structured and compact is None:  # resumed after the last round: compact it again
            compact = exp.granularity.structure.compact(model, masks, data.input_shape)
        rec.save_weights(model, masks)
        if compact is not None:
            rec.save_compact(compact, data.input_shape)
        summary = {
            "status": "completed",
            "criterion": cfg.criterion.name, "model": cfg.model.name, "dataset": cfg.dataset.name,
            "retrain": cfg.retrain.name, "schedule": cfg.schedule.name,
            "sparsity_requested": None if (exp.criterion.sets_own_sparsity or cfg.criterion.scope == "stage"
                                           or cfg.criterion.layer_rates) else cfg.sparsity,
            "seed": cfg.seed, "device": str(exp.device), "threads": torch.get_num_threads(),
            "params_total": rec.dense["params_total"], "prunable_total": rec.dense["prunable_total"],
            "dense_test_acc": rec.dense["test_acc"], "dense_test_loss": rec.dense["test_loss"],
            "flops": rec.dense["flops"],
            **({"dense_val_acc": rec.dense["val_acc"]} if has_val else {}),
            "test_examples": data.num_examples("test"),
            "rounds": rec.rounds, "final": rec.rounds[-1],
            "seconds_total": time.perf_counter() - started,
            "versions": versions(exp.device),
            "config": config,
        }
        summary = rec.finish(summary)
    except Diverged as e:
        # the run ends here, marked as such; a sweep's other jobs go on
        log.error(f"diverged in {stage}: {e}; the run stops (summary.json: status diverged)")
        summary = rec.finish_diverged({
            "status": "diverged", "diverged": {"stage": stage, "message": str(e)},
            "criterion": cfg.criterion.name, "model": cfg.model.name, "dataset": cfg.dataset.name,
            "seed": cfg.seed, "rounds": rec.rounds, "final": None,
            "dense_test_acc": rec.dense.get("test_acc"),
            "seconds_total": time.perf_counter() - started,
            "versions": versions(exp.device),
            "config": config,
        })
    finally:
        rec.close()
    if not cfg.checkpoint.keep:  # the run is finished: its summary.json says so
        checkpoints.remove()
    return summary


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
    except OSError:
        lock.close()
        raise CheckpointError(f"another prunebench process is running in {out_dir}; give this run its own "
                              f"directory (hydra.run.dir=...)") from None
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
             + (f": sparsity {final['sparsity']:.4f}, test acc {final['test_acc']:.4f}" if final else "")
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


def fit_state(saved: Optional[Dict]) -> Optional[FitState]:
    """The training phase a checkpoint stopped in (consumed once: later phases start fresh)."""
    if not saved or saved["fit"] is None:
        return None
    state, saved["fit"] = saved["fit"], None
    return FitState(**state)


def restore(saved: Dict, exp: Experiment, progress: Progress, checkpoints: RunCheckpoints) -> Optional[Dict]:
    """Put the run back as the checkpoint saw it; returns the round it stopped in, if it stopped
    while fine-tuning one. The random state is set last: rebuilding modules draws from it."""
    device = exp.device
    if saved["device"] != str(device):
        log.warning(f"the checkpoint was written on {saved['device']} and resumes on {device}: "
                    f"the numbers will not be bit-identical to an uninterrupted run")
    progress.model.load_state_dict(saved["model"])
    params = dict(progress.model.named_parameters())
    progress.masks = Masks({n: m.to(device, params[n].dtype) for n, m in saved["masks"].items()})
    progress.init_state = to_device(saved["init_state"], device)
    progress.rewind_state = to_device(saved["rewind_state"], device) or progress.init_state
    progress.rounds_done = saved["rounds_done"]
    if saved["dense_model"] is not None:
        progress.dense_model = exp.new_model().eval()
        progress.dense_model.load_state_dict(saved["dense_model"])
    resumed_round = saved["round"]
    if resumed_round is not None and resumed_round["compact"] is not None:
        compact = exp.granularity.structure.compact(progress.model, progress.masks, exp.data.input_shape)
        if exp.cfg.train.channels_last:
            compact = compact.to(memory_format=torch.channels_last)
        compact.load_state_dict(resumed_round["compact"])
        resumed_round = {**resumed_round, "compact": compact}
    set_rng_state(saved["rng"], checkpoints.generators, device)
    return resumed_round


def fresh_model(exp: Experiment, seed: int, round: int) -> nn.Module:
    """A new initialisation for reinit policies: its own seed per round, the global RNG (CPU and
    GPUs) untouched."""
    with seeded(seed * 1_000_003 + round):
        return exp.new_model()


@dataclass
class PruneStep:
    model: nn.Module  # the network pruned (another one when the criterion reparameterises)
    masks: Masks  # over the prunable weights
    enforced: Masks  # those and, for structured pruning, the removed units' biases and norm entries
    compensation: Dict  # what an OBS-type update reports
    macs: Optional[MacCount] = None  # the new network's dense MACs, when it changed


def prune_step(exp: Experiment, ctx: ScoreContext, target: Optional[Target]) -> PruneStep:
    """One round's pruning: (reparameterise) → score → select → compensate → zero."""
    model, macs = ctx.model, None
    # EigenDamage prunes in the Kronecker eigenbasis: the same function, another network
    reparameterized = exp.criterion.reparameterize(ctx, target)
    if reparameterized is not None:
        model = reparameterized
        cfg = exp.cfg.model
        ctx = replace(ctx, model=model, masks=Masks.ones(model, biases=cfg.prune_biases, norm=cfg.prune_norm))
        exp.granularity.bind(model, exp.data.input_shape)
        macs = count_macs(model, exp.data.input_shape)
    masks = exp.criterion.prune(ctx, target, exp.granularity)
    # OBS-type criteria move the surviving weights, from the unpruned ones, before masking
    compensation = exp.criterion.compensate(model, masks, ctx) or {}
    # structured: the removed units' biases and norm entries go too, so each outputs 0
    enforced = with_coupled(masks, exp.granularity, model)
    enforced.apply(model)
    return PruneStep(model, masks, enforced, compensation, macs)


def with_coupled(masks: Masks, granularity: Granularity, model: nn.Module) -> Masks:
    """The masks to enforce: the prunable weights', plus (structured) the removed units' biases
    and norm scale/shift."""
    if not granularity.structured:
        return masks
    return Masks({**dict(masks.items()), **dict(granularity.structure.coupled(masks, model).items())})


def units_removed(granularity: Granularity, masks: Masks) -> float:
    """Fraction of the units (filters, or EigenDamage's directions and channels) that are gone."""
    owners = granularity.owners(masks)
    total = sum(granularity.group_count(n, masks) for n in owners)
    return 1.0 - sum(int(granularity.alive(n, masks).sum()) for n in owners) / total


def compact_size(compact: nn.Module, input_shape, cfg: Config, dense: Dict, dense_macs: MacCount) -> Dict:
    """Size and compute of the compacted network, against the dense one.

    For structured pruning the round's size figures are those of the compacted network:
    sparsity = 1 - its prunable weights / the dense network's, compression = dense parameters /
    its parameters. For filter/channel pruning they equal the masked network's zero counts; for
    EigenDamage, whose network has another shape, they are the only honest ones."""
    macs = count_macs(compact, input_shape)
    prunable = sum(p.numel() for p in prunable_weights(compact, biases=cfg.model.prune_biases,
                                                        norm=cfg.model.prune_norm).values())
    params = count_params(compact)
    out = {
        "sparsity": 1.0 - prunable / dense["prunable_total"],
        "compression": dense["params_total"] / params,
        "params_remaining": params, "prunable_remaining": prunable,
        "flops_remaining": macs.total, "flops_reduction": dense_macs.total / max(1, macs.total),
        "channels": {n: int(m.weight.shape[0]) for n, m in compact.named_modules()
                     if isinstance(m, (nn.Conv2d, nn.Linear))},
    }
    return out


@torch.no_grad()
def check_compact(compact: nn.Module, model: nn.Module, data) -> None:
    """The compacted network must compute what the masked one does: a wrong graph would otherwise
    pass silently into every latency figure. In full fp32: with TF32, cuDNN may pick other
    algorithms for other channel counts, which differ by ~1e-3 relative."""
    x = next(iter(data.eval_batches("test", 64)))[0]
    modes = model.training, compact.training
    model.eval()
    compact.eval()
    with exact_fp32():
        ref, out = model(x), compact(x)
    model.train(modes[0])
    compact.train(modes[1])
    if not torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-5):
        raise RuntimeError(f"the compacted network's outputs differ from the masked network's "
                           f"(max abs difference {float((out - ref).abs().max()):.3g})")
