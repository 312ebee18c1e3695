"""`logger=wandb`: one wandb run per job, mirroring what the run directory records.

The local records are always written first and never depend on wandb: any wandb failure (not
installed, no network, a bad key) is reported once as a warning and turns wandb off for the
rest of the run. Round metrics use the achieved sparsity as their x-axis; the accuracy-vs-
sparsity curve across jobs is the report's (prunebench-report), or wandb's group view.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any, Dict, Optional

log = logging.getLogger("prunebench")

SUMMARY_KEYS = ("dense_test_acc", "dense_test_ppl", "test_examples", "test_tokens", "seconds_total",
                "sparsity_requested", "params_total", "prunable_total", "flops")


class WandbLogger:
    def __init__(self, cfg, config: Dict[str, Any], out_dir: Path, name: str, group: Optional[str],
                 job_type: str, resume: Optional[Dict[str, Any]] = None):
        """`resume`: a checkpoint's `state()`: the run resumed goes on in the same wandb run."""
        self.run = None
        self._epoch = resume["epoch"] if resume else 0
        self._call(self._init, cfg, config, out_dir, name, group, job_type, resume)

    def _init(self, cfg, config, out_dir, name, group, job_type, resume) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(mode=cfg.mode, project=cfg.project, entity=cfg.entity, tags=list(cfg.tags),
                              group=group, job_type=job_type, name=name, config=config, dir=str(out_dir),
                              **({"id": resume["id"], "resume": "allow"} if resume and resume.get("id") else {}))
        self.run.define_metric("epoch/step")
        self.run.define_metric("epoch/*", step_metric="epoch/step")
        self.run.define_metric("round/sparsity")
        self.run.define_metric("round/*", step_metric="round/sparsity")

    def _call(self, fn, *args) -> None:
        if fn != self._init and self.run is None:
            return
        try:
            fn(*args)
        except Exception as e:  # wandb must never cost the run or its local records
            log.warning(f"wandb is off for this run: {type(e).__name__}: {e}")
            self.run = None

    def state(self) -> Dict[str, Any]:
        """What a checkpoint keeps: the wandb run to go on in, and its epoch axis."""
        return {"id": self.run.id if self.run is not None else None, "epoch": self._epoch}

    def event(self, kind: str, fields: Dict[str, Any]) -> None:
        self._call(self._event, kind, fields)

    def _event(self, kind: str, fields: Dict[str, Any]) -> None:
        scalars = {k: v for k, v in fields.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if kind == "epoch":
            self._epoch += 1
            self.run.log({"epoch/step": self._epoch, **{f"epoch/{k}": v for k, v in scalars.items()}})
        elif kind == "round":
            self.run.log({f"round/{k}": v for k, v in scalars.items()})
        elif kind == "dense":
            self.run.summary.update({f"dense/{k}": v for k, v in scalars.items()})

    def finish(self, summary: Dict[str, Any], out_dir: Path) -> None:
        self._call(self._finish, summary, out_dir)

    def _finish(self, summary: Dict[str, Any], out_dir: Path) -> None:
        final = {f"final/{k}": v for k, v in summary["final"].items() if isinstance(v, (int, float))}
        self.run.summary.update({**{k: summary[k] for k in SUMMARY_KEYS if k in summary}, **final,
                                 "status": summary["status"]})
        if (out_dir / "curve.png").exists():
            self.run.log({"curve": self.wandb.Image(str(out_dir / "curve.png"))})
        if (out_dir / "layers.csv").exists():
            with open(out_dir / "layers.csv") as f:
                rows = list(csv.reader(f))
            self.run.log({"layers": self.wandb.Table(columns=rows[0], data=rows[1:])})
        self.run.finish()
        self.run = None

    def close(self) -> None:
        """A run that stops early: mark the wandb run failed (the local records say where it stopped)."""
        if self.run is not None:
            self._call(lambda: self.run.finish(exit_code=1))
