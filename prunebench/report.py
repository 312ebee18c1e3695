"""`prunebench-report DIR [DIR ...]`: a sweep's table and accuracy- (or perplexity-) vs-sparsity figure.

Finds every finished run (a directory with summary.json) under the given directories, groups
runs whose overrides differ only in the seed (or calibration.seed), and writes report.md, report.csv and report.png
(mean ± std over seeds) next to a rich table on the console. A line of the figure is a group
without its sparsity: one per criterion (or whatever else the sweep varied). Directories of runs
that never finished are counted and named, never averaged in.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

# overrides that say where things are, not what was run, and the seeds a group averages over (the
# run's, and the calibration sample's of layer-wise criteria)
IGNORED_KEYS = ("seed", "calibration.seed", "model.checkpoint", "data_dir", "hydra.")


@dataclass
class Run:
    path: Path
    overrides: List[str]
    summary: Dict


@dataclass
class Group:
    key: Tuple[str, ...]  # the overrides, seed left out
    runs: List[Run] = field(default_factory=list)

    def values(self, pick) -> List[float]:
        return [float(v) for v in (pick(r.summary) for r in self.runs) if v is not None]

    @property
    def series(self) -> Tuple[str, ...]:
        return tuple(o for o in self.key if not o.startswith("sparsity="))


def _overrides(run_dir: Path, summary: Dict) -> List[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if path.exists():
        import yaml  # plain strings, as typed (OmegaConf would turn "false" into False)

        found = [str(o) for o in yaml.safe_load(path.read_text()) or []]
    else:  # a run made from Python: what the summary says it was
        found = [f"criterion={summary['criterion']}", f"sparsity={summary.get('sparsity_requested')}"]
    return sorted(o for o in found if not o.lstrip("+~").startswith(IGNORED_KEYS))


def find_runs(dirs: Sequence[Path]) -> Tuple[List[Run], List[Path]]:
    """Finished runs, and run directories without a summary (unfinished or failed)."""
    runs, unfinished = [], []
    for d in dirs:
        if not d.exists():
            raise SystemExit(f"error: {d} does not exist")
        candidates = {p.parent for p in d.rglob("metrics.jsonl")} | {p.parent for p in d.rglob("summary.json")}
        if (d / "summary.json").exists():
            candidates.add(d)
        for run_dir in sorted(candidates):
            summary_path = run_dir / "summary.json"
            if not summary_path.exists():
                unfinished.append(run_dir)
                continue
            summary = json.loads(summary_path.read_text())
            if summary.get("status") != "completed":  # diverged (or any other non-result)
                unfinished.append(run_dir)
                continue
            runs.append(Run(run_dir, _overrides(run_dir, summary), summary))
    return runs, unfinished


def group_runs(runs: Sequence[Run]) -> List[Group]:
    groups: Dict[Tuple[str, ...], Group] = {}
    for run in runs:
        key = tuple(run.overrides)
        groups.setdefault(key, Group(key)).runs.append(run)
    return sorted(groups.values(), key=lambda g: (g.series, _sparsity(g)))


def _sparsity(group: Group) -> float:
    values = group.values(lambda s: s["final"]["sparsity"])
    return statistics.fmean(values) if values else 0.0


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


COLUMNS = {  # per metric: name, how to read it from a summary, format
    "acc": [
        ("test_acc", lambda s: s["final"]["test_acc"], "{:.4f}"),
        # right after the last pruning step, before its fine-tuning (post-training pruning's figure)
        ("test_acc_pruned", lambda s: s["final"].get("test_acc_pruned"), "{:.4f}"),
        ("sparsity", lambda s: s["final"]["sparsity"], "{:.4f}"),
        ("compression", lambda s: s["final"]["compression"], "{:.2f}"),
        ("flops_remaining", lambda s: s["final"].get("flops_remaining"), "{:.4g}"),
        ("dense_test_acc", lambda s: s["dense_test_acc"], "{:.4f}"),
    ],
    "ppl": [  # language models: perplexity right after pruning is the papers' figure
        ("test_ppl_pruned", lambda s: s["final"]["test_ppl_pruned"], "{:.3f}"),
        ("test_ppl", lambda s: s["final"]["test_ppl"], "{:.3f}"),
        ("sparsity", lambda s: s["final"]["sparsity"], "{:.4f}"),
        ("compression", lambda s: s["final"]["compression"], "{:.2f}"),
        ("dense_test_ppl", lambda s: s["dense_test_ppl"], "{:.3f}"),
    ],
}
FOOTNOTES = {
    "acc": "accuracy: the final epoch's, correct/total over the test set",
    "ppl": "perplexity: exp(mean next-token loss) over the evaluation split's windows, test_ppl_pruned right "
           "after pruning, test_ppl after any fine-tuning",
}


def zeroshot_columns(runs: Sequence[Run]) -> List:
    """Language models evaluated zero-shot (eval.tasks): lm-eval's mean acc right after pruning,
    at the end and dense, and each task's final acc; nothing when no run has them."""
    tasks = sorted({t for r in runs for t in ((r.summary["final"].get("zeroshot") or {}).get("tasks") or {})})
    if not tasks:
        return []

    def mean(key):
        return lambda s: (s["final"].get(key) or {}).get("mean_acc")

    def task_acc(task):
        return lambda s: ((s["final"].get("zeroshot") or {}).get("tasks", {}).get(task) or {}).get("acc")

    return [("zeroshot_pruned", mean("zeroshot_pruned"), "{:.4f}"), ("zeroshot", mean("zeroshot"), "{:.4f}"),
            ("dense_zeroshot", lambda s: (s.get("dense_zeroshot") or {}).get("mean_acc"), "{:.4f}"),
            *[(f"zeroshot_{t}", task_acc(t), "{:.4f}") for t in tasks]]


ZEROSHOT_NOTE = ("zeroshot: lm-evaluation-harness's zero-shot acc, the mean over eval.tasks, right after pruning, "
                 "at the end and dense; zeroshot_<task>: each task's at the end")


PROTOCOL_KEYS = ("name", "dataset", "seq_len", "last_window", "eval_windows", "tasks", "limit")


def check_one_protocol(runs: Sequence[Run]) -> None:
    """Language-model results of different protocols (window length, evaluation text, task list,
    lm-eval's limit) are not comparable: one report holds one."""
    stamps = {}
    for r in runs:
        stamp = r.summary.get("protocol")
        if stamp is not None:
            stamps.setdefault(json.dumps({k: stamp.get(k) for k in PROTOCOL_KEYS}, sort_keys=True), r.path)
    if len(stamps) > 1:
        differ = "; ".join(f"{path}: {key}" for key, path in stamps.items())
        raise SystemExit(f"error: these runs follow different evaluation protocols, whose numbers do not compare "
                         f"({differ}); report them apart")


def metric_of(runs: Sequence[Run]) -> str:
    """acc for classifiers, ppl for language models; a report holds one kind."""
    kinds = {"ppl" if "test_ppl" in r.summary["final"] else "acc" for r in runs}
    if len(kinds) > 1:
        raise SystemExit("error: these runs mix language models (perplexity) and classifiers (accuracy); "
                         "report them apart")
    return kinds.pop()


def common_overrides(groups: Sequence[Group]) -> List[str]:
    """Overrides every group shares: said once, left out of the row labels."""
    if len(groups) < 2:
        return []
    return sorted(set.intersection(*(set(g.key) for g in groups)))


def label(key: Sequence[str], common: Sequence[str]) -> str:
    return " ".join(o for o in key if o not in common) or "(defaults)"


def rows(groups: Sequence[Group], metric: str = "acc", columns: Optional[List] = None) -> List[Dict]:
    out = []
    common = common_overrides(groups)
    for g in groups:
        row = {"run": label(g.key, common), "seeds": len(g.runs)}
        for name, pick, _ in columns or COLUMNS[metric]:
            row[name], row[f"{name}_std"] = mean_std(g.values(pick))
        out.append(row)
    return out


def _cell(row: Dict, name: str, fmt: str) -> str:
    mean, std = row[name], row[f"{name}_std"]
    if math.isnan(mean):
        return "-"
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if row["seeds"] > 1 else "")


def write_markdown(table: Sequence[Dict], path: Path, unfinished: Sequence[Path], common: Sequence[str],
                   metric: str = "acc", columns: Optional[List] = None) -> None:
    columns = columns or COLUMNS[metric]
    names = [n for n, _, _ in columns]
    lines = [f"All runs: {' '.join(common)}", ""] if common else []
    lines += ["| run | seeds | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for row in table:
        cells = [_cell(row, n, f) for n, _, f in columns]
        lines.append(f"| {row['run']} | {row['seeds']} | " + " | ".join(cells) + " |")
    lines.append("")
    zeroshot = f"; {ZEROSHOT_NOTE}" if len(columns) > len(COLUMNS[metric]) else ""
    lines.append(f"Mean ± std over seeds of the last round, from summary.json ({FOOTNOTES[metric]}; "
                 f"sparsity: zeros really in the weights{zeroshot}).")
    if unfinished:
        lines.append(f"\n{len(unfinished)} run directories have no completed summary (unfinished, failed or "
                     f"diverged) and are left out: " + ", ".join(_why(p) for p in unfinished))
    path.write_text("\n".join(lines) + "\n")


def _why(run_dir: Path) -> str:
    path = run_dir / "summary.json"
    status = json.loads(path.read_text()).get("status") if path.exists() else "unfinished"
    if status == "unfinished" and (run_dir / "checkpoint.pt").exists():
        status = "unfinished, resumable: rerun its command with the same run/sweep directory"
    return f"{run_dir} ({status})"


def write_csv(table: Sequence[Dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)


def plot(groups: Sequence[Group], path: Path, log_density: bool, metric: str = "acc") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    common = common_overrides(groups)
    series: Dict[Tuple[str, ...], List[Group]] = {}
    for g in groups:
        series.setdefault(g.series, []).append(g)
    for key, members in series.items():
        xs, ys, errs = [], [], []
        for g in sorted(members, key=_sparsity):
            s, _ = mean_std(g.values(lambda s: s["final"]["sparsity"]))
            acc, acc_std = mean_std(g.values(lambda s: s["final"]["test_ppl_pruned" if metric == "ppl"
                                                                    else "test_acc"]))
            xs.append(1.0 - s if log_density else s)
            ys.append(acc)
            errs.append(acc_std)
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label(key, common))
    dense = [v for g in groups for v in g.values(lambda s: s[f"dense_test_{metric}"])]
    if dense and all(_trained_before_pruning(r.summary) for g in groups for r in g.runs):
        # (pruned at initialisation, "dense" would be an untrained network's accuracy)
        ax.axhline(statistics.fmean(dense), color="gray", linestyle="--", label="dense, trained")
    values = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
    if metric == "ppl" and values and max(values) > 3 * min(values):
        ax.set_yscale("log")  # magnitude pruning's perplexity can be many times that of the others
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if log_density:
        ax.set_xscale("log")
        ticks = sorted({round(x, 6) for line in ax.get_lines() for x in line.get_xdata() if x > 0})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.invert_xaxis()
        ax.set_xlabel("density (fraction of prunable weights left), log scale")
    else:
        ax.set_xlabel("sparsity (fraction of prunable weights that are zero)")
    ax.set_ylabel("test perplexity after pruning (lower is better)" if metric == "ppl" else "test accuracy")
    if common:
        ax.set_title(" ".join(common), fontsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _trained_before_pruning(summary: Dict) -> bool:
    """Whether dense_test_acc is a trained network's (gradual runs record it before their first
    pruning step, partly trained; dynamic runs at initialisation)."""
    config = summary.get("config", {})
    if config.get("model", {}).get("source") == "hf":  # a pretrained language model
        return True
    if config.get("schedule", {}).get("name") in ("gradual", "dynamic"):
        return False
    return bool(config.get("train", {}).get("pretrain_epochs", 1) or config.get("model", {}).get("checkpoint"))


def print_table(table: Sequence[Dict], metric: str = "acc", columns: Optional[List] = None) -> None:
    from rich.table import Table

    from .runs.record import CONSOLE

    t = Table(title="prunebench report")
    t.add_column("run")
    t.add_column("seeds", justify="right")
    columns = columns or COLUMNS[metric]
    for name, _, _ in columns:
        t.add_column(name, justify="right")
    for row in table:
        t.add_row(row["run"], str(row["seeds"]), *[_cell(row, n, f) for n, _, f in columns])
    CONSOLE.print(t)


def report(dirs: Sequence[Path], out: Optional[Path] = None, log_density: bool = False) -> Path:
    runs, unfinished = find_runs([Path(d) for d in dirs])
    if not runs:
        raise SystemExit(f"error: no finished run (summary.json) under {', '.join(map(str, dirs))}")
    out = Path(out or dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    groups, metric = group_runs(runs), metric_of(runs)
    check_one_protocol(runs)
    columns = COLUMNS[metric] + zeroshot_columns(runs)
    table = rows(groups, metric, columns)
    write_markdown(table, out / "report.md", unfinished, common_overrides(groups), metric, columns)
    write_csv(table, out / "report.csv")
    plot(groups, out / "report.png", log_density, metric)
    print_table(table, metric, columns)
    if unfinished:
        print(f"left out {len(unfinished)} unfinished run directories (see report.md)", file=sys.stderr)
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="prunebench-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run or sweep directories")
    parser.add_argument("--out", type=Path, help="where report.md/.csv/.png go (default: the first DIR)")
    parser.add_argument("--log-density", action="store_true", help="x-axis: density on a log scale")
    args = parser.parse_args(argv)
    written = report(args.dirs, args.out, args.log_density)
    print(f"wrote {written / 'report.md'}, report.csv, report.png")


try:  # the end-of-sweep hook, when Hydra is there (it always is with prunebench)
    from hydra.experimental.callback import Callback

    class ReportCallback(Callback):
        """Writes the report into the sweep directory when a multirun ends."""

        def on_multirun_end(self, config, **kwargs) -> None:
            sweep_dir = Path(config.hydra.sweep.dir)
            try:
                report([sweep_dir])
            except SystemExit as e:  # nothing finished: say so, the sweep's own errors come first
                print(f"prunebench-report: {e}", file=sys.stderr)
except ImportError:  # pragma: no cover
    pass


if __name__ == "__main__":
    main()
