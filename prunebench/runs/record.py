"""Everything a run reports: console lines and table, metrics.jsonl, layers.csv, summary.json, curve.png.

summary.json is written last and atomically: a run directory holding it is a finished run;
one without it is not, whatever else it holds.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:  # the console handler is set up before any config check: no torch here
    from ..core.metrics import WeightStats

log = logging.getLogger("prunebench")


def _make_console() -> Console:
    console = Console()
    if not console.is_terminal:  # CI and SLURM logs: wide plain lines, no live redraws
        console = Console(width=160, force_terminal=False)
    return console


CONSOLE = _make_console()
LIVE_PROGRESS = True  # off in jobs that share a terminal (the local parallel launcher)


def console_log_handler() -> logging.Handler:
    """The console handler of Hydra's job logging (conf/hydra/job_logging/prunebench.yaml)."""
    return RichHandler(console=CONSOLE, show_path=False, markup=False, rich_tracebacks=False,
                       log_time_format="[%X]")


# what a run is judged by: classifiers by test accuracy, language models by test perplexity
METRICS = {"acc": {"key": "test_acc", "short": "test acc", "axis": "test accuracy", "column": "acc", "fmt": "{:.4f}"},
           "ppl": {"key": "test_ppl", "short": "test ppl", "axis": "test perplexity (lower is better)",
                   "column": "ppl", "fmt": "{:.3f}"}}


def mean_accuracy(zeroshot: Optional[Dict[str, Any]]) -> str:
    """A zero-shot result's mean accuracy over its tasks, as the console table shows it."""
    value = (zeroshot or {}).get("mean_acc")
    return "" if value is None else f"{value:.4f}"


def write_json_atomic(path: Path, obj: Any) -> None:
    """`obj` as JSON under `path`: the whole file or (disk full, say) a clear error and none."""
    from .checkpoint import write_bytes_atomic

    write_bytes_atomic(path, (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode())


class Recorder:
    def __init__(self, out_dir: Path | str, title: str = "", total_epochs: int = 0, sinks: Sequence = (),
                 resume: Optional[Dict[str, Any]] = None, metric: str = "acc"):
        """`resume`: the records a checkpoint saved (`state()`); metrics.jsonl goes on from there.
        `metric`: acc (rows carry test_acc, test_acc_pruned) or ppl (test_ppl, test_ppl_pruned)."""
        self.out_dir = Path(out_dir)
        self.metric = METRICS[metric]
        self.sinks = list(sinks)  # e.g. a WandbLogger: gets every event, and the summary at the end
        self.title = title
        self.dense: Dict[str, Any] = {}
        self.rounds: List[Dict[str, Any]] = []
        self.layer_rows: List[Dict[str, Any]] = []
        self.epochs_done = 0
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # a rerun into the same directory must not leave the old result looking current
        for stale in ("summary.json", "layers.csv", "curve.png", "model.pt", "masks.pt", "model_sparse.pt",
                      "model_compact.pt2"):
            (self.out_dir / stale).unlink(missing_ok=True)
        metrics = self.out_dir / "metrics.jsonl"
        if resume is None:
            self._metrics = open(metrics, "w")
        else:
            self.dense, self.rounds, self.layer_rows = resume["dense"], resume["rounds"], resume["layer_rows"]
            self.epochs_done = resume["epochs_done"]
            if not metrics.exists() or metrics.stat().st_size < resume["metrics_bytes"]:
                from .checkpoint import CheckpointError

                raise CheckpointError(f"{metrics} is shorter than the checkpoint says it was; the run directory "
                                      f"was altered (checkpoint.resume=false starts the run over)")
            self._metrics = open(metrics, "r+")
            self._metrics.truncate(resume["metrics_bytes"])  # events after the checkpoint are redone
            self._metrics.seek(resume["metrics_bytes"])
        # a live bar on a terminal only; elsewhere the per-epoch log lines say the same
        self._progress = None
        if LIVE_PROGRESS and CONSOLE.is_terminal and total_epochs > 0:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=CONSOLE, transient=True)
            self._task = self._progress.add_task("epochs", total=total_epochs, completed=self.epochs_done)
            self._progress.start()

    def state(self) -> Dict[str, Any]:
        """What a checkpoint keeps of the records (plain JSON values)."""
        self._metrics.flush()
        return json.loads(json.dumps({"dense": self.dense, "rounds": self.rounds, "layer_rows": self.layer_rows,
                                      "epochs_done": self.epochs_done, "metrics_bytes": self._metrics.tell(),
                                      "sinks": [s.state() if hasattr(s, "state") else None for s in self.sinks]}))

    # ------------------------------------------------------------------------------ events
    def event(self, kind: str, **fields) -> None:
        self._metrics.write(json.dumps({"event": kind, **fields}) + "\n")
        self._metrics.flush()
        for sink in self.sinks:
            sink.event(kind, fields)

    def epoch(self, phase: str, round: int, epoch: int, epochs: int, train_loss: float, lr: float,
              seconds: float, test_acc: Optional[float] = None, test_loss: Optional[float] = None,
              **extra) -> None:
        self.event("epoch", phase=phase, round=round, epoch=epoch, train_loss=train_loss, lr=lr,
                   test_acc=test_acc, test_loss=test_loss, seconds=seconds, **extra)
        self.epochs_done += 1
        where = {"pretrain": "pretrain", "gradual": "training (gradual pruning)", "dynamic": "sparse training",
                 "finetune": f"round {round} finetune"}.get(phase, phase)
        value = extra.get(self.metric["key"], test_acc)
        test = f"  {self.metric['short']} {self.metric['fmt'].format(value)}" if value is not None else ""
        log.info(f"{where} epoch {epoch}/{epochs}  train loss {train_loss:.4f}{test}  ({seconds:.1f}s)")
        if self._progress is not None:
            self._progress.update(self._task, advance=1, description=where)

    def show(self, row: Dict[str, Any], suffix: str = "") -> str:
        """The row's metric (test_acc or test_ppl, with suffix _pruned), formatted."""
        return self.metric["fmt"].format(row[self.metric["key"] + suffix])

    def record_dense(self, figures: Dict[str, float], stats: WeightStats, **extra) -> None:
        """`figures`: the metric and the loss on the test set (test_acc/test_ppl, test_loss)."""
        self.dense = {**figures, "params_total": stats.params_total, "prunable_total": stats.prunable_total,
                      "flops": stats.flops or None, **extra}
        self.event("dense", **self.dense)
        self._layers(0, stats)
        at = {None: "", 0: " (at initialisation)"}.get(extra.get("at_step"),
                                                      f" (after {extra.get('at_step')} steps, before pruning)")
        log.info(f"dense{at}: {self.metric['short']} {self.show(self.dense)}, {stats.prunable_total:,} prunable "
                 f"weights of {stats.params_total:,} parameters")

    def record_round(self, row: Dict[str, Any], stats: WeightStats) -> None:
        self.rounds.append(row)
        self.event("round", **row)
        self._layers(row["round"], stats, row.get("layer_errors", {}))
        target = "" if row["target_sparsity"] is None else f" (target {row['target_sparsity']:.4f})"
        if "units_removed" in row:  # structured: the target counts units, the sparsity weights
            target = f", units removed {row['units_removed']:.4f}{target}"
        trained = row.get("finetune_epochs", row.get("recovery_epochs", 1))
        log.info(f"round {row['round']}: sparsity {row['sparsity']:.4f}{target}, compression "
                 f"{row['compression']:.2f}x, {self.metric['short']} {self.show(row, '_pruned')} after pruning"
                 + (f", {self.show(row)} after finetuning" if trained else " (no finetuning)"))

    def _layers(self, round: int, stats: WeightStats, errors: Optional[Dict[str, float]] = None) -> None:
        errors = errors or {}
        for s in stats.layers:
            self.layer_rows.append({"round": round, "layer": s.layer, "shape": "x".join(map(str, s.shape)),
                                    "params": s.params, "nonzero": s.nonzero, "density": s.density,
                                    "flops": s.flops, "flops_remaining": s.flops_remaining,
                                    **({"reconstruction_error": errors[s.layer]} if s.layer in errors else {})})

    def save_weights(self, model, masks) -> None:
        """The final pruned model (state_dict, pruned weights exactly zero) and its masks, as CPU
        tensors: a run on a GPU writes files that a machine without one opens."""
        import torch

        from ..core.csr import sparse_state_dict

        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, self.out_dir / "model.pt")
        masks.save(self.out_dir / "masks.pt")
        # the same weights with the pruned ones left out: CSR rows (sparse.sparse_state_dict)
        torch.save(sparse_state_dict(model), self.out_dir / "model_sparse.pt")

    def file_bytes(self) -> Dict[str, int]:
        """Sizes on disk of the saved networks."""
        names = ("model.pt", "model_sparse.pt", "model_compact.pt2")
        return {n: (self.out_dir / n).stat().st_size for n in names if (self.out_dir / n).exists()}

    def save_compact(self, model, input_shape) -> None:
        """The compacted network as a torch.export program: `torch.export.load(path).module()`
        runs it with torch alone (no prunebench code), for any batch size; exported from a CPU
        copy, so that it loads on any machine."""
        import copy

        import torch

        model = copy.deepcopy(model).cpu().eval()
        example = torch.zeros((2,) + tuple(input_shape))
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, self.out_dir / "model_compact.pt2")

    # ------------------------------------------------------------------------------ finish
    def finish(self, summary: Dict[str, Any]) -> Dict[str, Any]:
        """Write layers.csv and curve.png, then summary.json (the completion marker), then print."""
        self._stop()
        with open(self.out_dir / "layers.csv", "w", newline="") as f:
            errors = any("reconstruction_error" in r for r in self.layer_rows)  # calibration.layer_errors
            writer = csv.DictWriter(f, fieldnames=["round", "layer", "shape", "params", "nonzero", "density",
                                                   "flops", "flops_remaining"] + ["reconstruction_error"] * errors)
            writer.writeheader()
            writer.writerows(self.layer_rows)
        self.plot_curve(self.out_dir / "curve.png")
        write_json_atomic(self.out_dir / "summary.json", summary)
        for sink in self.sinks:
            sink.finish(summary, self.out_dir)
        self.print_table()
        return summary

    def finish_diverged(self, summary: Dict[str, Any]) -> Dict[str, Any]:
        """A run that diverged: its summary.json says so (and carries the rounds it completed)."""
        self._stop()
        write_json_atomic(self.out_dir / "summary.json", summary)
        return summary

    def close(self) -> None:
        """The end of a run, finished or not (a sink still open then marks its run failed)."""
        for sink in self.sinks:
            sink.close()
        self._stop()

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if not self._metrics.closed:
            self._metrics.close()

    def plot_curve(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        key = self.metric["key"]
        xs = [0.0] + [r["sparsity"] for r in self.rounds]
        ys = [self.dense[key]] + [r[key] for r in self.rounds]
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        ax.plot(xs, ys, "o-", label="after finetuning")
        ax.plot([r["sparsity"] for r in self.rounds], [r[f"{key}_pruned"] for r in self.rounds],
                "x--", alpha=0.7, label="after pruning, before finetuning")
        ax.axhline(self.dense[key], color="gray", lw=0.8, ls=":", label="dense")
        ax.set_xlabel("sparsity (fraction of prunable weights that are zero)")
        ax.set_ylabel(self.metric["axis"])
        ax.set_title(self.title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)

    def print_table(self) -> None:
        table = Table(title=self.title, title_style="bold")
        column = self.metric["column"]
        zeroshot = "zeroshot" in self.dense  # language models with eval.tasks: lm-eval's mean accuracy
        for col in ("round", "target", "sparsity", "compression", f"{column} pruned", f"{column} final",
                    *(("0-shot pruned", "0-shot final") if zeroshot else ()), "score s", "train s"):
            table.add_column(col, justify="right")
        table.add_row("dense", "", "0.0000", "1.00x", "", self.show(self.dense),
                      *(("", mean_accuracy(self.dense.get("zeroshot"))) if zeroshot else ()), "", "")
        for r in self.rounds:
            target = "" if r["target_sparsity"] is None else f"{r['target_sparsity']:.4f}"
            table.add_row(str(r["round"]), target, f"{r['sparsity']:.4f}", f"{r['compression']:.2f}x",
                          self.show(r, "_pruned"), self.show(r),
                          *((mean_accuracy(r.get("zeroshot_pruned")), mean_accuracy(r.get("zeroshot")))
                            if zeroshot else ()),
                          f"{r.get('score_seconds', 0.0):.2f}", f"{r['train_seconds']:.1f}")
        CONSOLE.print(table)
