"""logger=wandb: one offline wandb run per job, read back; failures never cost the local records."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, make_config, run_cli

from prunebench.pipeline import run

KEY = "fake-secret-key-1234567890abcdef1234567890abcdef12345678"


def inspect(run_dir: Path):
    """(summary object, raw records) of a job's offline wandb run."""
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    wandb = Path(sys.executable).with_name("wandb")
    summary = subprocess.run([str(wandb), "leet", "inspect", "--summary", "--json", str(offline)],
                             capture_output=True, text=True, timeout=120)
    records = subprocess.run([str(wandb), "leet", "inspect", "--json", str(offline)],
                             capture_output=True, text=True, timeout=120)
    return json.loads(summary.stdout), records.stdout


@pytest.mark.slow
def test_each_job_of_a_sweep_is_a_wandb_run_in_the_sweeps_group(tmp_path):
    result = run_cli("-m", *FAST, "logger=wandb", "logger.mode=offline", "criterion=magnitude,random",
                     "dataset.num_train=128", "dataset.num_test=64", f"hydra.sweep.dir={tmp_path}",
                     env={"WANDB_API_KEY": KEY})
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(jobs) == 2
    for job in jobs:
        local = json.loads((job / "summary.json").read_text())
        summary, records = inspect(job)
        assert summary["state"] == "finished"
        assert summary["config"]["criterion"]["name"] == local["criterion"]
        assert summary["summary"]["final/test_acc"] == local["final"]["test_acc"]
        assert summary["summary"]["dense_test_acc"] == local["dense_test_acc"]
        assert summary["summary"]["curve"]["_type"] == "image-file"
        assert f'"run_group":"{tmp_path}"' in records and f'"job_type":"{local["criterion"]}"' in records
    # the API key is in no file the sweep wrote
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_a_wandb_failure_is_reported_once_and_the_run_completes(tmp_path, monkeypatch, caplog):
    import wandb

    def broken(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken)
    summary = run(make_config("logger=wandb", "dataset.num_train=128", "dataset.num_test=64"), tmp_path)
    assert summary["status"] == "completed" and (tmp_path / "summary.json").exists()
    warnings = [r for r in caplog.records if "wandb is off" in r.getMessage()]
    assert len(warnings) == 1 and "no network" in warnings[0].getMessage()


def test_a_resumed_run_goes_on_in_the_same_wandb_run(tmp_path, monkeypatch):
    import signal

    import pytest
    from test_resume import StopAfter

    from prunebench.runs.checkpoint import Interrupted

    cfg = make_config("logger=wandb", "logger.mode=offline", "dataset.num_train=128", "dataset.num_test=64",
                      "train.finetune_epochs=2")
    with monkeypatch.context() as m:
        StopAfter(m, signal.SIGTERM, "finetune", 1, 1)
        with pytest.raises(Interrupted):
            run(cfg, tmp_path)
    (first,) = (tmp_path / "wandb").glob("offline-run-*")
    run(cfg, tmp_path)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # an offline run dir per attempt (offline-run-<time>-<run id>[-n]), both of one wandb run
    assert len(runs) == 2
    assert len({p.name.split("-")[3] for p in runs}) == 1
    resumed = next(p for p in runs if p != first)
    wandb = Path(sys.executable).with_name("wandb")
    summary = json.loads(subprocess.run([str(wandb), "leet", "inspect", "--summary", "--json", str(resumed)],
                                        capture_output=True, text=True, timeout=120).stdout)
    assert summary["state"] == "finished"
    assert summary["summary"]["final/test_acc"] == json.loads((tmp_path / "summary.json").read_text())["final"][
        "test_acc"]
