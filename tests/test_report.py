"""prunebench-report: groups runs over seeds, averages honestly, leaves unfinished runs out."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, run_cli

from prunebench.report import report


def fake_run(root: Path, name: str, criterion: str, sparsity: float, seed: int, acc: float, done=True):
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(
        f"- criterion={criterion}\n- sparsity={sparsity}\n- seed={seed}\n- model.checkpoint=/x/{seed}.pt\n")
    (d / "metrics.jsonl").write_text("{}\n")
    if done:
        final = {"test_acc": acc, "sparsity": sparsity, "compression": 1 / (1 - sparsity), "flops_remaining": 10}
        (d / "summary.json").write_text(json.dumps({
            "status": "completed", "criterion": criterion, "seed": seed, "dense_test_acc": 0.9,
            "sparsity_requested": sparsity, "final": final, "rounds": [final]}))


@pytest.fixture
def sweep(tmp_path):
    accs = {("snip", 0.5): (0.80, 0.82), ("snip", 0.9): (0.70, 0.74), ("random", 0.5): (0.60, 0.60),
            ("random", 0.9): (0.30, 0.40)}
    i = 0
    for (criterion, sparsity), seeds in accs.items():
        for seed, acc in enumerate(seeds):
            fake_run(tmp_path, f"{i}_job", criterion, sparsity, seed, acc)
            i += 1
    fake_run(tmp_path, "99_crashed", "snip", 0.5, 2, 0.0, done=False)
    return tmp_path


def test_report_averages_over_seeds_and_names_unfinished_runs(sweep):
    report([sweep])
    with open(sweep / "report.csv") as f:
        table = {row["run"]: row for row in csv.DictReader(f)}
    assert set(table) == {"criterion=random sparsity=0.5", "criterion=random sparsity=0.9",
                          "criterion=snip sparsity=0.5", "criterion=snip sparsity=0.9"}
    snip = table["criterion=snip sparsity=0.9"]
    assert int(snip["seeds"]) == 2  # the crashed seed-2 run is not averaged in
    assert float(snip["test_acc"]) == pytest.approx(0.72)
    assert float(snip["test_acc_std"]) == pytest.approx(0.0282843, rel=1e-5)  # sample std of 0.70, 0.74
    md = (sweep / "report.md").read_text()
    assert "| criterion=snip sparsity=0.9 | 2 | 0.7200 ± 0.0283 |" in md
    assert "99_crashed" in md and "left out" in md
    assert (sweep / "report.png").stat().st_size > 10_000


def test_report_command_fails_clearly_without_finished_runs(tmp_path):
    fake_run(tmp_path, "0_job", "snip", 0.5, 0, 0.0, done=False)
    exe = Path(sys.executable).with_name("prunebench-report")
    result = subprocess.run([str(exe), str(tmp_path)], capture_output=True, text=True)
    assert result.returncode != 0 and "no finished run" in result.stderr
    assert not (tmp_path / "report.md").exists()


@pytest.mark.slow
def test_a_multirun_writes_its_report_when_it_ends(tmp_path):
    result = run_cli("-m", *FAST, "model=lenet300", "dataset.num_train=128", "dataset.num_test=64",
                     "criterion=magnitude,random", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / "report.csv") as f:
        runs = sorted(row["run"] for row in csv.DictReader(f))
    assert runs == ["criterion=magnitude", "criterion=random"]  # what the jobs share is said once
    assert (tmp_path / "report.md").read_text().startswith("All runs: dataset.num_test=64 dataset.num_train=128")


@pytest.mark.slow
def test_local_launcher_runs_jobs_in_processes_that_share_the_cores(tmp_path):
    result = run_cli("-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2", *FAST, "model=lenet300",
                     "dataset.num_train=128", "dataset.num_test=64", "seed=0,1", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(jobs) == 2
    cpus = os.cpu_count()
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        assert summary["threads"] == max(1, cpus // min(2, cpus))
        assert "round 1" in (job / "prunebench.log").read_text()
    assert "seeds" in (tmp_path / "report.md").read_text()
