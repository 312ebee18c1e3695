"""The experiment: build → pretrain → rounds of (score → select → mask → retrain policy → finetune).

Read top to bottom, `run` is the recipe of a pruning paper. Everything that can reject the
configuration (names, ranges, a missing dataset, an unreachable sparsity) happens in `build`,
before any training; summary.json is written only when the last round is done.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from . import __version__
from .config import Config, ConfigError, finetune_recipe, round_targets, to_plain
from .criteria import Criterion, ScoreContext, build_criterion
from .data import TensorData, build_dataset
from .granularity import Granularity, build_granularity
from .masks import Masks, prunable_weights
from .metrics import MacCount, count_macs, weight_stats
from .models import build_model
from .record import Recorder
from .retrain import apply_policy, snapshot
from .select import SelectOptions, Target, check_exclusions, check_reachable, layers_in_scope
from .structure import compare_latency, count_params, expand_into
from .train import Diverged, evaluate, fit

log = logging.getLogger("prunebench")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} was asked for but no CUDA device is available; use device=cpu or auto")
    return torch.device(name)


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


def build(cfg: Config) -> Experiment:
    device = resolve_device(cfg.device)
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
    targets = plan_targets(cfg, criterion, granularity, masks)
    macs = count_macs(model, data.input_shape)
    return Experiment(cfg, device, data, model, new_model, masks, criterion, granularity, targets, macs)


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
    """The whole experiment into `out_dir`; `group` names the sweep it belongs to (for wandb)."""
    started = time.perf_counter()
    exp = build(cfg)
    model, data, train = exp.model, exp.data, cfg.train
    title = (f"{cfg.criterion.name} · {cfg.model.name} · {cfg.dataset.name} · {cfg.retrain.name} · "
             f"{cfg.schedule.name} · seed {cfg.seed}")
    sinks = []
    if cfg.logger.name == "wandb":
        from .wandb_logger import WandbLogger

        sinks.append(WandbLogger(cfg.logger, to_plain(cfg), Path(out_dir), name=Path(out_dir).name, group=group,
                                 job_type=cfg.criterion.name))
    rec = Recorder(out_dir, title, train.pretrain_epochs + len(exp.targets) * train.finetune_epochs, sinks)
    stage = "pretraining"  # where the run is, for a divergence report
    try:
        # separate streams, so changing one choice (say, the criterion) leaves the others' draws alone
        data_order = torch.Generator().manual_seed(cfg.seed)
        score_rng = torch.Generator().manual_seed(cfg.seed + 1)

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
        init_state = snapshot(model)
        rewind_state = init_state
        pretrain_log = logger("pretrain", 0, train.pretrain_epochs)

        def on_pretrain_epoch(res):
            nonlocal rewind_state
            if cfg.retrain.name == "rewind" and res.epoch == cfg.retrain.rewind_epoch:
                rewind_state = snapshot(model)
            pretrain_log(res)

        fit(model, data, train, train.pretrain_epochs, train.lr, data_order, on_epoch_end=on_pretrain_epoch)
        dense = test()
        structured = exp.granularity.structured
        rec.record_dense(dense.accuracy, dense.loss, weight_stats(model, exp.masks, exp.macs), **val())
        # structured: the dense network, to time against each round's compacted one
        dense_model = copy.deepcopy(model).eval() if structured and cfg.latency.repeats else None

        # ---- pruning rounds
        finetune = finetune_recipe(train)
        masks, macs = exp.masks, exp.macs
        compact = None
        for r, target in enumerate(exp.targets, 1):
            stage = f"round {r}"
            t0 = time.perf_counter()

            ctx = ScoreContext(model, masks, round=r, rounds=len(exp.targets), init_state=init_state,
                               batches=lambda: data.train_batches(train.batch_size, score_rng),
                               generator=score_rng, input_shape=data.input_shape, num_classes=data.num_classes)
            step = prune_step(exp, ctx, target)
            model, masks, enforced = step.model, step.masks, step.enforced
            macs = step.macs or macs
            score_seconds = time.perf_counter() - t0
            pruned = test()  # after pruning, before retraining

            t1 = time.perf_counter()
            diagnostics = apply_policy(cfg.retrain, model, masks, init_state=init_state,
                                       rewind_state=rewind_state, fresh_model=lambda: fresh_model(exp, cfg.seed, r))
            if structured:
                # fine-tune the physically smaller network, then write it back into the masked one
                enforced.apply(model)
                compact = exp.granularity.structure.compact(model, masks, data.input_shape)
                if train.channels_last:
                    compact = compact.to(memory_format=torch.channels_last)
                fit(compact, data, finetune, train.finetune_epochs, finetune.lr, data_order,
                    on_epoch_end=logger("finetune", r, train.finetune_epochs, compact))
                expand_into(exp.granularity.structure, model, compact, masks)
            else:
                fit(model, data, finetune, train.finetune_epochs, finetune.lr, data_order,
                    masks=enforced, on_epoch_end=logger("finetune", r, train.finetune_epochs))
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
                "empty_layers": empty, **step.compensation,
                **({cfg.retrain.name: diagnostics} if diagnostics else {}),
            }
            if structured:
                check_compact(compact, model, data)
                row["units_removed"] = units_removed(exp.granularity, masks)
                row.update(compact_size(compact, data.input_shape, cfg, rec.dense, exp.macs))
                if dense_model is not None:
                    lat = cfg.latency
                    row.update(compare_latency(dense_model, compact, data.input_shape, lat.batch_sizes,
                                               lat.repeats, lat.warmup))
            rec.record_round(row, stats)

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
            "versions": {"prunebench": __version__, "torch": torch.__version__},
            "config": to_plain(cfg),
        }
        return rec.finish(summary)
    except Diverged as e:
        # the run ends here, marked as such; a sweep's other jobs go on
        log.error(f"diverged in {stage}: {e}; the run stops (summary.json: status diverged)")
        return rec.finish_diverged({
            "status": "diverged", "diverged": {"stage": stage, "message": str(e)},
            "criterion": cfg.criterion.name, "model": cfg.model.name, "dataset": cfg.dataset.name,
            "seed": cfg.seed, "rounds": rec.rounds, "final": None,
            "dense_test_acc": rec.dense.get("test_acc"),
            "seconds_total": time.perf_counter() - started,
            "versions": {"prunebench": __version__, "torch": torch.__version__},
            "config": to_plain(cfg),
        })
    finally:
        rec.close()


def fresh_model(exp: Experiment, seed: int, round: int) -> nn.Module:
    """A new initialisation for reinit policies: its own seed per round, the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + round)
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
    pass silently into every latency figure."""
    x = next(iter(data.eval_batches("test", 64)))[0]
    modes = model.training, compact.training
    model.eval()
    compact.eval()
    ref, out = model(x), compact(x)
    model.train(modes[0])
    compact.train(modes[1])
    if not torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-5):
        raise RuntimeError(f"the compacted network's outputs differ from the masked network's "
                           f"(max abs difference {float((out - ref).abs().max()):.3g})")
