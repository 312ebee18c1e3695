"""A diverging run (NaN/inf training loss) stops with status diverged; a sweep's other jobs go on."""

import json

import pytest
from conftest import FAST, make_config, run_cli

from prunebench.pipeline import run


def test_a_diverging_run_is_recorded_as_diverged(tmp_path, caplog):
    cfg = make_config("train.optimizer=sgd", "train.lr=1e12", "dataset.num_train=256", "dataset.num_test=64")
    summary = run(cfg, tmp_path)
    assert summary["status"] == "diverged" and summary["final"] is None and summary["rounds"] == []
    assert summary["diverged"]["stage"] == "pretraining" and "training loss became" in summary["diverged"]["message"]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "curve.png").exists()
    assert any("diverged in pretraining" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_a_sweep_goes_on_past_a_diverged_job_and_the_report_names_it(tmp_path):
    result = run_cli("-m", *FAST, "dataset.num_train=256", "dataset.num_test=64", "train.optimizer=sgd",
                     "train.lr=1e12,0.01", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    statuses = sorted(json.loads(p.read_text())["status"] for p in tmp_path.glob("*/summary.json"))
    assert statuses == ["completed", "diverged"]
    report = (tmp_path / "report.md").read_text()
    assert "(diverged)" in report and "train.lr=0.01" in report
