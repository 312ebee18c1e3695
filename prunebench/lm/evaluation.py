"""Zero-shot task accuracy of a language model through lm-evaluation-harness (lm-eval 0.4).

The harness runs on the run's model and tokenizer as they are in memory (its HFLM wrapper takes a
model instance: nothing is loaded a second time), on the run's device, with lm-eval's own
`simple_evaluate`, so the numbers are the ones `lm_eval --tasks ... --num_fewshot 0` prints for the
same weights. A result (`zeroshot` in summary.json and metrics.jsonl):

    {"harness": "0.4.13", "num_fewshot": 0, "limit": null, "mean_acc": 0.61, "seconds": 12.3,
     "tasks": {"boolq": {"acc": .., "acc_stderr": .., "version": 2.0, "samples": 3270}, ...}}

Each task keeps every metric lm-eval reports for it (acc, and acc_norm where the task has it);
`mean_acc` is the plain mean of `acc` over the tasks that report it (every multiple-choice task
does), the one figure that means the same for every task. Tasks are checked in the run's build step,
before any work: an unknown name is refused with its close matches, and each task's data set is
loaded once, so a task whose data are neither in the Hugging Face datasets cache nor reachable is
one line naming the task and where it looked.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import os
import random
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ..config import ConfigError, EvalConfig

log = logging.getLogger("prunebench")


@functools.lru_cache(maxsize=4)
def task_manager(include_path: Optional[str]):
    """lm-eval's index of its tasks (and include_path's): seconds to build, so built once."""
    quiet_harness()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def quiet_harness() -> None:
    """lm-eval warns at every model passed as an instance and logs each task it builds."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def check_tasks(cfg: EvalConfig) -> None:
    """Every task exists and its data can be read; raises ConfigError before any work."""
    if not cfg.tasks:
        return
    if cfg.include_path is not None and not Path(cfg.include_path).is_dir():
        raise ConfigError(f"eval.include_path={cfg.include_path} is not a directory")
    manager = task_manager(cfg.include_path)
    for name in cfg.tasks:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            hint = f"close matches: {', '.join(close)}" if close else "no close match"
            raise ConfigError(f"eval.tasks: lm-eval has no task {name!r} ({hint}; eval.include_path adds "
                              f"tasks from a directory of YAML files)")
    for name in cfg.tasks:
        check_task_data(manager, name)


def check_task_data(manager, name: str) -> None:
    """Loads the task, which loads its data set (small tasks: a second; from the cache offline)."""
    try:
        manager.load([name])
    except Exception as error:  # datasets raises many kinds for data it cannot find
        raise ConfigError(f"eval.tasks: the data of task {name!r} could not be loaded: looked for "
                          f"{data_source(manager, name)} {cache_description()} "
                          f"({type(error).__name__}: {first_line(error)})") from None


def data_source(manager, name: str) -> str:
    entry = manager.task_index.get(name)
    cfg = (entry.cfg if entry is not None else None) or {}
    path, subset = cfg.get("dataset_path"), cfg.get("dataset_name")
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    where = f"{path}" + (f" ({subset})" if subset else "") + (f" files {files}" if files else "")
    return where if path else f"the data set of {name}"


def cache_description() -> str:
    from datasets import config

    offline = any(os.environ.get(v, "0").upper() in ("1", "ON", "YES", "TRUE")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return f"in the Hugging Face datasets cache {config.HF_DATASETS_CACHE}" + (", offline" if offline else "")


def first_line(error: Exception, width: int = 200) -> str:
    text = str(error).strip().splitlines()
    return text[0][:width] if text else ""


# ------------------------------------------------------------------------------ evaluation
def evaluate(model: nn.Module, tokenizer, cfg: EvalConfig, device: torch.device, stage: str) -> Optional[Dict]:
    """lm-eval's zero-shot results for the model as it is (None when eval.tasks is empty); the
    model goes to the device for it and back to the CPU, as for perplexity."""
    if not cfg.tasks:
        return None
    started = time.perf_counter()
    model.to(device).eval()
    try:
        raw = harness_results(model, tokenizer, cfg)
    finally:
        model.to("cpu")
    result = summarize(raw, cfg, time.perf_counter() - started)
    log.info(f"zero-shot ({stage}): {describe(result)}")
    return result


def harness_results(model: nn.Module, tokenizer, cfg: EvalConfig) -> Dict:
    """lm-eval's simple_evaluate on the in-memory model (its own seeds, our random state left as it was)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(cfg.include_path)
    with kept_random_state():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
        return simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=0, limit=cfg.limit,
                               task_manager=manager, log_samples=False)


@contextlib.contextmanager
def kept_random_state():
    """simple_evaluate seeds Python's, NumPy's and torch's generators: the run's draws after it
    (recovery's windows, dropout) must not depend on whether zero-shot evaluation ran."""
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        yield
    random.setstate(python)
    np.random.set_state(numpy)


def summarize(raw: Dict, cfg: EvalConfig, seconds: float) -> Dict:
    """The figures prunebench records from simple_evaluate's results."""
    import lm_eval

    groups = set(raw.get("groups", {}))
    tasks = {name: task_figures(raw, name) for name in raw["results"] if name not in groups}
    return {"harness": lm_eval.__version__, "num_fewshot": 0, "limit": cfg.limit,
            "mean_acc": mean_acc(tasks), "seconds": seconds, "tasks": tasks}


def task_figures(raw: Dict, name: str) -> Dict:
    """Each metric without a filter (`acc,none` → acc), the task's version and examples scored."""
    figures = {key.split(",")[0]: value for key, value in raw["results"][name].items()
               if key.endswith(",none") and isinstance(value, (int, float))}
    samples = raw.get("n-samples", {}).get(name, {})
    return {**figures, "version": raw.get("versions", {}).get(name), "samples": samples.get("effective")}


def mean_acc(tasks: Dict[str, Dict]) -> Optional[float]:
    accs: List[float] = [t["acc"] for t in tasks.values() if "acc" in t]
    return sum(accs) / len(accs) if accs else None


def describe(result: Dict) -> str:
    mean = result["mean_acc"]
    per_task = " · ".join(f"{name} {t['acc']:.4f}" for name, t in result["tasks"].items() if "acc" in t)
    head = "mean acc n/a" if mean is None else f"mean acc {mean:.4f}"
    return f"{head} ({per_task}; {result['seconds']:.1f}s)"


def fields(key: str, result: Optional[Dict]) -> Dict:
    """{key: result} for a record, or nothing when zero-shot evaluation is off."""
    return {} if result is None else {key: result}
