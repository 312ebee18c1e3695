"""summary.json's fields: what the run was, what it measured, and what moves its numbers."""

from __future__ import annotations

import time
from typing import Dict, Optional

import torch

from .. import __version__
from ..config import LM_STRUCTURES
from ..core import distributed
from .state import RunState


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
        **({"granularity": exp.granularity.describe(run.progress.masks)}
           if exp.granularity.local or exp.granularity.name in LM_STRUCTURES else {}),
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
