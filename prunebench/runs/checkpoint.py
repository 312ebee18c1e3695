"""Checkpoints: a run that is killed, preempted or timed out resumes where it stopped.

A run directory holds at most one checkpoint, `checkpoint.pt`. It is replaced at the end of
pretraining, at the end of every round, every `checkpoint.every_epochs` epochs of training, and
when a stop signal arrives (SIGTERM, SIGUSR1, SIGUSR2: what SLURM sends before a time limit or a
preemption), at the next mini-batch. It holds everything the rest of the run depends on: the
model, the masks, θ0 and the rewind point, the optimizer and LR schedule of the phase in
progress, every random generator's state and the records so far. So a resumed run on the CPU
writes the same summary.json as one never interrupted (wall-clock fields aside).

The file is a header line `prunebench-checkpoint 1 sha256=<hex>` followed by what torch.save
writes. It is written beside its final name, flushed to disk and renamed, so a kill leaves the
old checkpoint or the new one, never half of one. It is loaded with torch.load(weights_only=True)
(tensors, numbers, strings: no code runs on load), after its digest is checked, and refused if
the digest does not match or if it belongs to another configuration.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ..config import ConfigError
from ..core.distributed import world
from ..core.masks import Masks
from ..training.hooks import Hook

log = logging.getLogger("prunebench")

FILE = "checkpoint.pt"
FORMAT = 1  # the layout of what a checkpoint holds; load() refuses any other
MAGIC = b"prunebench-checkpoint 1 sha256="
# keys of the config that change no number of the run: a checkpoint or a finished run is the
# same run whatever they say (data_dir may differ between cluster nodes; a run may resume on
# another device, warned that its numbers will not be bit-identical)
NOT_COMPARED = ("checkpoint", "logger", "data_dir", "device")


class CheckpointError(ConfigError):
    """A checkpoint or run directory that cannot be used (or written); reported in one line."""


# ------------------------------------------------------------------------------ file format
def write_bytes_atomic(path: Path, data: bytes) -> None:
    """`data` under `path`, or (disk full, directory not writable) a clear error and no file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash of the machine
        finally:
            os.close(dir_fd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {path}: {e.strerror or e} (is the disk full, or the directory "
                              f"not writable?); the run stops here") from None


def save(path: Path, state: Dict[str, Any]) -> int:
    """Write a checkpoint atomically; returns its size in bytes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    write_bytes_atomic(path, MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    return len(payload)


def load(path: Path) -> Dict[str, Any]:
    """A checkpoint's contents, after checking it is whole and unaltered."""
    how_to_discard = "delete it, or run with checkpoint.resume=false to start the run over"
    data = path.read_bytes()
    header, _, payload = data.partition(b"\n")
    if not header.startswith(MAGIC):
        raise CheckpointError(f"{path} is not a prunebench checkpoint (unknown header); {how_to_discard}")
    if hashlib.sha256(payload).hexdigest().encode() != header[len(MAGIC):]:
        raise CheckpointError(f"{path} is corrupt: its contents do not match the digest written with them "
                              f"(truncated or altered); {how_to_discard}")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:
        lines = str(e).splitlines()
        why = next((line.strip() for line in lines if "Unsupported global" in line), lines[0] if lines else "")
        raise CheckpointError(f"{path} cannot be loaded safely ({type(e).__name__}: {why}); "
                              f"{how_to_discard}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise CheckpointError(f"{path} holds checkpoint format {found}, and this prunebench reads format {FORMAT}; "
                              f"{how_to_discard}")
    return state


# ---------------------------------------------------------------------------- configuration
# inputs whose whole effect is in other, resolved keys (train.pretrain_epochs, finetune_*)
RESOLVED = {"train": ("epochs",), "criterion": ("prunes_at",)}


def compared(config: Dict[str, Any]) -> Dict[str, Any]:
    out = {k: v for k, v in config.items() if k not in NOT_COMPARED}
    for group, keys in RESOLVED.items():
        if isinstance(out.get(group), dict):
            out[group] = {k: v for k, v in out[group].items() if k not in keys}
    return out


def differences(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> List[str]:
    """`key: old -> new` for every leaf where two plain configs differ."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


# options added since runs were first recorded, with the values that runs recorded before them
# ran with: such a run is still the same run (a sweep goes on across an upgrade)
ADDED_OPTIONS: Dict[str, Any] = {"curvature": {"memory_gb": None}, "deterministic": False, "tf32": True}


def with_added_options(config: Dict[str, Any]) -> Dict[str, Any]:
    return {**ADDED_OPTIONS, **config}


def check_same_config(what: str, stored: Dict[str, Any], current: Dict[str, Any]) -> None:
    diff = differences(compared(with_added_options(stored)), compared(current))
    if diff:
        shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
        raise CheckpointError(f"{what} of another configuration ({shown}); give this run its own "
                              f"directory (hydra.run.dir=...), or checkpoint.resume=false to overwrite it")


# ------------------------------------------------------------------------------ random state
def rng_state(generators: Dict[str, torch.Generator], device: torch.device) -> Dict[str, Any]:
    """Every random stream the run draws from: Python's, NumPy's, torch's (the CPU's and the run
    device's, when that is a GPU), and the run's own generators (data order, scoring)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "generators": {k: g.get_state() for k, g in generators.items()},
    }


def set_rng_state(state: Dict[str, Any], generators: Dict[str, torch.Generator], device: torch.device) -> None:
    """As `rng_state` saw them; a GPU stream only onto a GPU (a checkpoint from another device
    resumes with the warning that its numbers will differ)."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if isinstance(state["cuda"], torch.Tensor) and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    for k, g in generators.items():
        g.set_state(state["generators"][k])


# --------------------------------------------------------------------------------- signals
STOP_SIGNALS = tuple(getattr(signal, s) for s in ("SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, s))


class Interrupted(Exception):
    """A stop signal arrived; the run checkpointed (where it could) and stops."""

    def __init__(self, signum: int, previous: Any):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum, self.previous = signum, previous

    def deliver(self) -> None:
        """Hand the signal to whoever handled it before the run: submitit's handler requeues the
        SLURM job; with none, the process ends by the signal, as it would have without us."""
        if callable(self.previous):
            self.previous(self.signum, None)  # submitit: requeue, then exit
        elif self.previous == signal.SIG_DFL:
            signal.signal(self.signum, signal.SIG_DFL)
            os.kill(os.getpid(), self.signum)
        sys.exit(128 + self.signum)


class StopSignals:
    """While a run is in progress, a stop signal only sets `requested`: training checkpoints at the
    next mini-batch and raises Interrupted (see `check`)."""

    def __init__(self):
        self.requested: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        try:
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: signals stay as they were
            self._previous.clear()
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested is None:
            log.warning(f"{signal.Signals(signum).name} received: checkpointing at the next mini-batch, then stopping")
        self.requested = signum

    def check(self, save: Optional[Callable[[], None]] = None) -> None:
        """If a stop was asked for: save (when the run can be checkpointed here), then stop."""
        if self.requested is None:
            return
        if save is not None:
            save()
        raise Interrupted(self.requested, self._previous.get(self.requested, signal.SIG_DFL))


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read ({e}); delete it, or run with checkpoint.resume=false "
                              f"to start the run over") from None


# ------------------------------------------------------------------------------ one run's
@dataclass
class RunProgress:
    """What a run has done so far, beyond its records and random state: what it resumes from."""

    model: nn.Module
    masks: Masks
    init_state: Dict[str, torch.Tensor]  # θ0
    rewind_state: Dict[str, torch.Tensor]  # the rewind point: θ0, or the weights after epoch k
    rounds_done: int = -1  # -1: still pretraining; 0: pretrained; r: round r recorded
    dense_model: Optional[nn.Module] = None  # structured: the trained dense net, to time against
    macs: Any = None  # the pruned network's dense MACs when pruning changed its architecture (not saved)

    def state_dict(self) -> Dict[str, Any]:
        return {"rounds_done": self.rounds_done, "model": self.model.state_dict(),
                "masks": {n: m.bool() for n, m in self.masks.items()},  # 0/1: one byte each, not four
                "init_state": self.init_state,
                "rewind_state": None if self.rewind_state is self.init_state else self.rewind_state,
                "dense_model": None if self.dense_model is None else self.dense_model.state_dict()}

    def load_state_dict(self, state: Dict[str, Any], device: torch.device, new_model: Callable[[], nn.Module]) -> None:
        self.model.load_state_dict(state["model"])
        params = dict(self.model.named_parameters())
        self.masks = Masks({n: m.to(device, params[n].dtype) for n, m in state["masks"].items()})
        self.init_state = to_device(state["init_state"], device)
        self.rewind_state = to_device(state["rewind_state"], device) or self.init_state
        self.rounds_done = state["rounds_done"]
        if state["dense_model"] is not None:
            self.dense_model = new_model().eval()
            self.dense_model.load_state_dict(state["dense_model"])


class RunCheckpoints:
    """Writes one run's checkpoint.pt and hands stop signals on (see the module's docstring)."""

    def __init__(self, out_dir: Path, config: Dict[str, Any], every_epochs: int, recorder,
                 generators: Dict[str, torch.Generator], stop: StopSignals, started: float, device: str):
        self.path = Path(out_dir) / FILE
        self.config, self.every_epochs, self.recorder = config, every_epochs, recorder
        self.generators, self.stop, self.started, self.device = generators, stop, started, device
        self.writes: List[Dict[str, float]] = []  # seconds and bytes of each write, for the record

    def save(self, where: str, progress: RunProgress, fit=None, round_state: Optional[Dict[str, Any]] = None) -> None:
        if not world().main:  # every rank holds rank 0's state and resumes from rank 0's file
            return
        t0 = time.perf_counter()
        state = {
            "format": FORMAT, "where": where, "config": json.dumps(self.config), "device": self.device,
            "versions": {"torch": str(torch.__version__)},
            **progress.state_dict(),
            "fit": None if fit is None else fit.to_dict(),
            "round": round_state,
            "records": self.recorder.state(),
            "rng": rng_state(self.generators, torch.device(self.device)),
            "seconds": time.perf_counter() - self.started,
        }
        size = save(self.path, state)
        seconds = time.perf_counter() - t0
        self.writes.append({"seconds": seconds, "bytes": size})
        self.recorder.event("checkpoint", where=where, seconds=seconds, bytes=size)

    def restore(self, saved: Dict[str, Any], progress: RunProgress, new_model: Callable[[], nn.Module]) -> None:
        """Put the run back as the checkpoint `saved` saw it. The random state is set last:
        rebuilding modules draws from it."""
        device = torch.device(self.device)
        if saved["device"] != self.device:
            log.warning(f"the checkpoint was written on {saved['device']} and resumes on {device}: "
                        f"the numbers will not be bit-identical to an uninterrupted run")
        progress.load_state_dict(saved, device, new_model)
        set_rng_state(saved["rng"], self.generators, device)

    def phase(self, where: str, progress: RunProgress, round_state: Optional[Callable[[], Dict[str, Any]]] = None,
              savable: bool = True) -> "PhaseCheckpoints":
        """The hook that checkpoints a training phase (train.fit) and stops it on a signal."""
        return PhaseCheckpoints(self, where, progress, round_state, savable)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class PhaseCheckpoints(Hook):
    """Saves a training phase every `checkpoint.every_epochs` epochs and, on a stop signal, at the
    next mini-batch, then stops it (unsaved when the phase cannot be restored, as EigenDamage's
    rewritten network)."""

    def __init__(self, run: RunCheckpoints, where: str, progress: RunProgress,
                 round_state: Optional[Callable[[], Dict[str, Any]]], savable: bool):
        self.run, self.where, self.progress, self.round_state = run, where, progress, round_state
        self.savable, self.every = savable, run.every_epochs if savable else 0

    def save(self, fit) -> None:
        at = f"{self.where} epoch {fit.epoch}" + (f" + {fit.batch} batches" if fit.batch else "")
        self.run.save(at, self.progress, fit, self.round_state() if self.round_state else None)

    def stop(self, fit) -> None:
        self.run.stop.check(lambda: self.save(fit) if fit is not None and self.savable else None)

    def before_step(self, loop) -> None:
        if self.run.stop.requested is not None:  # a flag read per step, nothing more
            self.stop(loop.state())

    def epoch_end(self, loop, result) -> None:
        if loop.epochs_done == loop.epochs:  # the run's own checkpoint that follows the phase saves it
            return
        due = self.every and loop.epochs_done % self.every == 0
        stopping = self.run.stop.requested is not None
        if due or stopping:
            state = loop.state()
            if due:
                self.save(state)
            if stopping:
                self.stop(None if due else state)  # already saved: only stop


def to_device(state: Optional[Dict[str, torch.Tensor]], device) -> Optional[Dict[str, torch.Tensor]]:
    return None if state is None else {k: v.to(device) for k, v in state.items()}
