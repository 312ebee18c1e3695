"""A run, top to bottom: hold the run directory, report a finished run or resume a stopped one,
build the experiment (runs/experiment.py: every check before any training), then let its
schedule run it (schedules/) — or the language-model recipe (lm/) — and write summary.json once
the last round is done.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Optional

import torch

from .config import Config, ConfigError, to_plain
from .core import distributed
from .retrain import snapshot
from .runs.checkpoint import FILE as CHECKPOINT_FILE
from .runs.checkpoint import CheckpointError, RunProgress, RunCheckpoints, StopSignals, check_same_config, read_json
from .runs.checkpoint import load as load_checkpoint_file
from .runs.experiment import Experiment, make_recorder
from .runs.experiment import build as build_experiment
from .runs.state import RunState
from .runs.summary import summary_fields
from .schedules import build_schedule
from .training.loop import Diverged

log = logging.getLogger("prunebench")


def build(cfg: Config) -> Experiment:
    """The run's pieces and checks (runs/experiment.py) with its schedule's."""
    return build_experiment(cfg, build_schedule(cfg.schedule))


def run(cfg: Config, out_dir: Path | str, group: Optional[str] = None) -> Dict:
    """The whole experiment into `out_dir`; `group` names the sweep it belongs to (for wandb).

    A directory that holds this configuration's finished run is reported, not run again; one that
    holds its checkpoint resumes from it (runs/checkpoint.py)."""
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
    progress = RunProgress(exp.model, exp.masks, init_state, init_state)
    checkpoints = RunCheckpoints(out_dir, config, cfg.checkpoint.every_epochs, rec,
                                 {"data_order": data_order, "score": score_rng}, stop, started, str(exp.device))
    run_state = RunState(cfg, exp, rec, progress, checkpoints, stop, data_order, score_rng, saved)
    try:
        if saved:
            checkpoints.restore(saved, progress, exp.new_model)
        resumed_round = saved["round"] if saved else None  # the state of the phase it stopped in
        compact = exp.schedule.run(run_state, resumed_round)
        rec.save_weights(run_state.model, progress.masks)
        if compact is not None:
            rec.save_compact(compact, exp.data.input_shape)
        summary = rec.finish({"status": "completed", **summary_fields(run_state, started, config, rec.rounds[-1]),
                              "file_bytes": rec.file_bytes()})
    except Diverged as e:
        # the run ends here, marked as such; a sweep's other jobs go on
        log.error(f"diverged in {run_state.stage}: {e}; the run stops (summary.json: status diverged)")
        summary = rec.finish_diverged({"status": "diverged", "diverged": {"stage": run_state.stage, "message": str(e)},
                                       **summary_fields(run_state, started, config, None)})
    finally:
        rec.close()
    if not cfg.checkpoint.keep:  # the run is finished: its summary.json says so
        checkpoints.remove()
    return summary


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
