"""Sparse from the start (SET, Mocanu et al. 2018; RigL, Evci et al. 2020): each layer's density
from a budget (uniform, ER, ERK) → an initial mask → train, and every ΔT steps until T_end drop
the live weights of smallest magnitude and regrow as many → fine-tune at the final mask → record.

Each update is a `mask_update` event in metrics.jsonl (α_t, per-layer drop/grow counts, the
fraction of the initial mask still live); the record has one row, for the whole run."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config, ConfigError
from ..criteria import CRITERIA, build_criterion
from ..core.allocation import layer_densities
from ..core.masks import Masks
from ..core.metrics import weight_stats
from .steps import record_dense, sparse_fields, train_then_finetune
from ..core.select import SelectOptions, layers_in_scope, module_of
from ..runs.rows import accuracy, round_row
from ..runs.state import RunState
from . import Schedule, register
from ..core.device import autocast, to_layout
from ..training.hooks import MaskUpdates
from ..training.loop import steps_per_epoch


def check_dynamic(cfg: Config, criterion, granularity, masks: Masks) -> None:
    """Before any training: a budget that exists, a granularity and an initial mask it can use."""
    if cfg.model.prune_biases or cfg.model.prune_norm:
        raise ConfigError("schedule=dynamic makes Conv/Linear weights sparse: it does not take model.prune_biases "
                          "or model.prune_norm")
    if granularity.name != "unstructured":
        raise ConfigError(f"schedule=dynamic drops and regrows single weights: it needs granularity=unstructured, "
                          f"not granularity={granularity.name}")
    if cfg.schedule.init == "criterion" and criterion.needs_trained:
        at_init = [n for n in CRITERIA if not CRITERIA[n].needs_trained]
        raise ConfigError(f"schedule.init=criterion: criterion={cfg.criterion.name} needs a trained network and "
                          f"the mask is chosen at initialisation; use schedule.init=random or criterion="
                          f"{', '.join(at_init)}")
    if not layers_in_scope(masks, SelectOptions.of(cfg.criterion)):
        raise ConfigError("schedule=dynamic: no prunable layer to make sparse (all are excluded)")
    budget(cfg, masks)


def budget(cfg: Config, masks: Masks) -> Dict[str, float]:
    """Each layer's target sparsity (excluded layers: 0)."""
    in_scope = layers_in_scope(masks, SelectOptions.of(cfg.criterion))
    shapes = {n: masks[n].shape for n in masks}
    density = layer_densities(cfg.schedule.distribution, shapes, [n for n in masks if n not in in_scope],
                              cfg.sparsity, masks.numel())
    return {n: 1.0 - density.get(n, 1.0) for n in masks}


class DynamicSparse(MaskUpdates):
    """fit's mask updates for SET and RigL (static: none)."""

    def __init__(self, run: RunState, initial: Masks, at_init, state: Optional[Dict] = None):
        cfg = run.cfg.schedule
        self.run, self.initial, self.cfg = run, initial, cfg
        self.at_init = at_init  # [accuracy, loss] of the sparse initialisation
        total = run.cfg.train.pretrain_epochs * steps_per_epoch(run.exp.data, run.cfg.train.batch_size)
        self.t_end = int(cfg.end * total)
        self.updates = (state or {}).get("updates", 0)
        self.score_seconds = (state or {}).get("score_seconds", 0.0)  # choosing the initial mask
        self.scope = layers_in_scope(run.progress.masks, SelectOptions.of(run.cfg.criterion))

    def due(self, step: int) -> bool:
        return self.cfg.method != "static" and step % self.cfg.every == 0 and step <= self.t_end

    def alpha(self, step: int) -> float:
        return self.cfg.alpha / 2 * (1 + math.cos(math.pi * step / self.t_end))

    def update(self, step: int, model: nn.Module, batch) -> Masks:
        masks, alpha = self.run.progress.masks, self.alpha(step)
        params = dict(model.named_parameters())
        grads = dense_gradients(model, [params[n] for n in self.scope], batch, self.run.cfg.train) \
            if self.cfg.method == "rigl" else None
        new, dropped = dict(masks.items()), {}
        for i, name in enumerate(self.scope):
            grow_scores = grads[i].abs() if grads is not None else \
                torch.rand(masks[name].shape, generator=self.run.score_rng).to(masks[name].device)
            new[name], dropped[module_of(name)] = drop_and_grow(masks[name], params[name].detach(), grow_scores,
                                                                alpha)
        self.run.progress.masks = Masks(new)
        self.updates += 1
        self.run.rec.event("mask_update", step=step, alpha=alpha, dropped=dropped, grown=dropped,
                           initial_mask_kept=self.initial_kept())
        return self.run.progress.masks

    def initial_kept(self) -> float:
        """The fraction of the initial mask's live weights that are live now."""
        masks = self.run.progress.masks
        live = sum(float((self.initial[n].to(masks[n]) * masks[n]).sum()) for n in self.scope)
        return live / max(1.0, sum(float(self.initial[n].sum()) for n in self.scope))

    def state(self, trained: bool = False) -> Dict:
        return {"updates": self.updates, "trained": trained, "initial": self.initial.state_dict(),
                "at_init": list(self.at_init), "score_seconds": self.score_seconds}


def drop_and_grow(mask: Tensor, weight: Tensor, grow_scores: Tensor, alpha: float):
    """Drop the round(α·live) live weights of smallest |w| and grow as many where `grow_scores` is
    largest among those not live after the drop (ties to the lower index); returns the new mask
    and the count."""
    flat, live = mask.reshape(-1), mask.reshape(-1) != 0
    k = round(alpha * int(live.sum()))
    if k == 0:
        return mask, 0
    magnitude = torch.where(live, weight.reshape(-1).abs(), torch.full_like(flat, math.inf))
    kept = live.clone()
    kept[largest(-magnitude, k)] = False
    scores = torch.where(kept, torch.full_like(flat, -math.inf), grow_scores.reshape(-1).to(flat))
    out = kept.clone()
    out[largest(scores, k)] = True
    return out.to(mask.dtype).reshape(mask.shape), k


def largest(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores, ties at the boundary to the lower index (a top-k and two
    comparisons: a full sort of a large layer costs several times more)."""
    threshold = torch.topk(scores, k).values[-1]
    above = (scores > threshold).nonzero().squeeze(1)
    at = (scores == threshold).nonzero().squeeze(1)[:k - above.numel()]
    return torch.cat([above, at])


def dense_gradients(model: nn.Module, weights: List[Tensor], batch, train) -> List[Tensor]:
    """∂L/∂w of the batch's loss for every weight, pruned ones included (RigL's growth signal);
    the batch-norm statistics are left as they were (the step itself updated them)."""
    x, y = batch
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with autocast(train.precision, x.device):
        loss = F.cross_entropy(model(to_layout(x, train.channels_last)), y)
    grads = torch.autograd.grad(loss, weights)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    return grads


def initial_mask(run: RunState) -> Masks:
    """The initial mask in the layer budget: random, or by the criterion's scores at init."""
    cfg = run.cfg
    if cfg.schedule.init == "random":
        criterion = build_criterion(replace(cfg.criterion, name="random", scope="layer"))
    else:
        criterion = build_criterion(replace(cfg.criterion, scope="layer"))
    return criterion.prune(run.score_context(1, 1), budget(cfg, run.progress.masks), run.exp.granularity)


def train_sparse(run: RunState, resumed: Optional[Dict]) -> None:
    """The whole run: initial mask → sparse training with updates → fine-tune → one record row."""
    cfg, exp, progress = run.cfg, run.exp, run.progress
    resumed = resumed or {}
    if progress.rounds_done >= 1:  # the checkpoint holds the finished run
        return
    if resumed:
        initial = Masks({n: m.to(progress.masks[n]) for n, m in resumed["initial"].items()})
        updates = DynamicSparse(run, initial, resumed["at_init"], resumed)
    else:
        record_dense(run, at_step=0)  # the initialisation, before it is made sparse
        t0 = time.perf_counter()
        progress.masks = initial_mask(run)
        score_seconds = time.perf_counter() - t0
        progress.masks.apply(run.model)
        at_init = run.test()
        updates = DynamicSparse(run, progress.masks, [at_init.accuracy, at_init.loss])
        updates.score_seconds = score_seconds
    started = time.perf_counter()
    run.stage = f"sparse training ({cfg.schedule.method})"
    train_then_finetune(run, "dynamic", updates, resumed.get("trained", False), 1)
    final, stats = run.test(), weight_stats(run.model, progress.masks, exp.macs)
    at_init = {"test_acc": updates.at_init[0], "test_loss": updates.at_init[1]}
    run.rec.record_round(round_row(1, cfg.sparsity, stats, at_init, {**accuracy(final), **run.val()},
                                   updates.score_seconds, time.perf_counter() - started, exp.macs.total,
                                   mask_updates=updates.updates, initial_mask_kept=updates.initial_kept(),
                                   **sparse_fields(run)), stats)
    progress.rounds_done = 1
    run.checkpoints.save("round 1", progress)
    run.stop.check()


@register("dynamic")
class Dynamic(Schedule):
    multi_process = False

    def check(self, cfg, criterion, granularity, masks, data) -> None:
        check_dynamic(cfg, criterion, granularity, masks)

    def run(self, run: RunState, resumed: Optional[Dict]) -> Optional[nn.Module]:
        train_sparse(run, resumed)
        return None
