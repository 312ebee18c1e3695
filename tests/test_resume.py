"""Runs that survive: killed (SIGKILL) or stopped (SIGTERM) runs resume from checkpoint.pt to the
numbers of an uninterrupted run; finished runs are not run twice; bad checkpoints are refused."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_config, read_summary, run_cli, without_timings

from prunebench.runs import checkpoint
from prunebench.pipeline import run, run_directory

# three rounds, epochs long enough (a few tenths of a second) to be killed inside one
THREE_ROUNDS = ["dataset=synthetic", "dataset.num_train=16384", "schedule=iterative", "schedule.rounds=3",
                "train.pretrain_epochs=3", "train.finetune_epochs=2", "sparsity=0.8",
                "train.eval_every_epoch=false"]


def start(args, out):
    exe = Path(sys.executable).with_name("prunebench")
    return subprocess.Popen([str(exe), *args, f"hydra.run.dir={out}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})


def events(out):
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return found


def signal_when(proc, out, when, sig, timeout=180):
    """Send `sig` to the run as soon as metrics.jsonl holds an event matching `when`."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if any(when(e) for e in events(out)):
            proc.send_signal(sig)
            break
        time.sleep(0.002)
    proc.wait(timeout=120)
    return proc.returncode


def checkpoint_of(out):
    return checkpoint.load(Path(out) / checkpoint.FILE)


def same_run(a, b):
    """Two run directories hold the same result: summary (wall-clock fields aside), weights, masks."""
    summaries = [without_timings(read_summary(d)) for d in (a, b)]
    for summary in summaries:
        summary["config"].pop("checkpoint")  # how often it checkpoints changes no number
    assert summaries[0] == summaries[1]
    for name in ("model.pt", "masks.pt"):
        x, y = (torch.load(Path(d) / name, weights_only=True) for d in (a, b))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    losses = [[(e["phase"], e["round"], e["epoch"], e["train_loss"]) for e in events(d) if e["event"] == "epoch"]
              for d in (a, b)]
    assert losses[0] == losses[1]  # every epoch once, with the same loss


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = run_cli(*THREE_ROUNDS, f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (out / checkpoint.FILE).exists()  # a finished run keeps no checkpoint (checkpoint.keep=false)
    return out


KILL_POINTS = {
    # name: (the event after which the run is killed, what the checkpoint it resumes from must be)
    "during pretraining": (lambda e: e.get("where") == "pretrain epoch 1",
                           lambda where: where.startswith("pretrain epoch")),
    "between rounds": (lambda e: e["event"] == "round" and e["round"] == 1,
                       lambda where: where in ("round 1 finetune epoch 1", "round 1")),
    "during finetuning": (lambda e: e.get("where") == "round 2 finetune epoch 1",
                          # (or, on a machine stalled for a whole epoch, just after it)
                          lambda where: where in ("round 2 finetune epoch 1", "round 2")),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_killed_run_resumes_to_the_uninterrupted_numbers(point, uninterrupted, tmp_path):
    when, expected_checkpoint = KILL_POINTS[point]
    code = signal_when(start(THREE_ROUNDS, tmp_path), tmp_path, when, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (tmp_path / "summary.json").exists()  # nothing looks finished
    where = checkpoint_of(tmp_path)["where"]
    assert expected_checkpoint(where), where

    resumed = run_cli(*THREE_ROUNDS, f"hydra.run.dir={tmp_path}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {tmp_path / checkpoint.FILE} (saved at {where})" in resumed.stdout + resumed.stderr
    same_run(tmp_path, uninterrupted)
    assert [e["where"] for e in events(tmp_path) if e["event"] == "resumed"] == [where]


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_next_batch_and_the_run_resumes(uninterrupted, tmp_path):
    # no periodic checkpoints: the one after the signal is the signal's
    args = [*THREE_ROUNDS, "checkpoint.every_epochs=0"]
    proc = start(args, tmp_path)
    code = signal_when(proc, tmp_path, lambda e: e.get("where") == "pretrained", signal.SIGTERM)
    assert code == -signal.SIGTERM, proc.stderr.read()[-2000:]  # ends by the signal, as without us
    where = checkpoint_of(tmp_path)["where"]
    assert where.startswith("round 1 finetune epoch"), where
    assert not (tmp_path / "summary.json").exists()

    resumed = run_cli(*args, f"hydra.run.dir={tmp_path}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    same_run(tmp_path, uninterrupted)


@pytest.mark.slow
def test_a_finished_run_is_reported_not_run_again(uninterrupted):
    before = (uninterrupted / "summary.json").read_bytes()
    proc = run_cli(*THREE_ROUNDS, f"hydra.run.dir={uninterrupted}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already holds this run, completed" in proc.stdout + proc.stderr
    assert "epoch" not in [e["event"] for e in events(uninterrupted)][-1:]  # nothing appended
    assert (uninterrupted / "summary.json").read_bytes() == before

    other = run_cli(*THREE_ROUNDS, "sparsity=0.5", f"hydra.run.dir={uninterrupted}")
    assert other.returncode == 2
    assert "another configuration (sparsity: 0.8 -> 0.5)" in other.stderr
    assert (uninterrupted / "summary.json").read_bytes() == before


# ----------------------------------------------------------------------- in process (fast)
def small(*extra):
    return make_config("schedule=iterative", "schedule.rounds=2", "train.finetune_epochs=2", "sparsity=0.75",
                       *extra)


class StopAfter:
    """Sends this process a signal when a given epoch event is recorded."""

    def __init__(self, monkeypatch, sig, phase, round, epoch):
        from prunebench.runs.record import Recorder

        original = Recorder.epoch

        def record_epoch(rec, phase_, round_, epoch_, *args, **kwargs):
            original(rec, phase_, round_, epoch_, *args, **kwargs)
            if (phase_, round_, epoch_) == (phase, round, epoch):
                os.kill(os.getpid(), sig)

        monkeypatch.setattr(Recorder, "epoch", record_epoch)


@pytest.mark.parametrize("extra", [
    ("retrain=rewind", "retrain.rewind_epoch=1"),  # θ0 and the rewind point come back from the checkpoint
    pytest.param(("model=conv2", "granularity=filter", "latency.repeats=1", "latency.batch_sizes=[2]"),
                 marks=pytest.mark.slow),  # compacted finetune
], ids=["rewind", "structured"])
def test_a_signal_during_finetuning_resumes_in_process(extra, monkeypatch, tmp_path):
    cfg = small(*extra)
    reference = run(cfg, tmp_path / "reference")

    with monkeypatch.context() as m:
        StopAfter(m, signal.SIGUSR1, "finetune", 2, 1)
        with pytest.raises(checkpoint.Interrupted):
            run(cfg, tmp_path / "stopped")
    saved = checkpoint_of(tmp_path / "stopped")
    assert saved["where"].startswith("round 2 finetune epoch 1")
    assert (saved["round"]["compact"] is not None) == ("granularity=filter" in extra)
    resumed = run(cfg, tmp_path / "stopped")

    assert without_wall_clock(resumed) == without_wall_clock(reference)
    assert without_wall_clock(read_summary(tmp_path / "stopped")) == without_wall_clock(reference)


def without_wall_clock(obj):
    """Without timings of any kind (seconds, latencies, speedups)."""
    if isinstance(obj, dict):
        return {k: without_wall_clock(v) for k, v in obj.items()
                if not any(t in k for t in ("seconds", "latency", "speedup"))}
    if isinstance(obj, list):
        return [without_wall_clock(v) for v in obj]
    return obj


def test_every_epochs_zero_checkpoints_only_at_phase_ends(tmp_path):
    run(small("checkpoint.every_epochs=0", "checkpoint.keep=true"), tmp_path)
    wheres = [e["where"] for e in events(tmp_path) if e["event"] == "checkpoint"]
    assert wheres == ["pretrained", "round 1", "round 2"]
    assert checkpoint_of(tmp_path)["where"] == "round 2"  # kept


def test_resume_false_starts_over(tmp_path):
    cfg = small()
    run(cfg, tmp_path)
    first = read_summary(tmp_path)
    again = run(small("checkpoint.resume=false"), tmp_path)
    assert again["seconds_total"] != first["seconds_total"]  # really run again
    assert without_timings(again) == without_timings({**first, "config": again["config"]})


# ------------------------------------------------------------------ refused checkpoints
def write_payload(path, payload: bytes):
    path.write_bytes(checkpoint.MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


@pytest.fixture()
def stopped_run(monkeypatch, tmp_path):
    """A run directory holding a mid-run checkpoint, and its config."""
    cfg = small()
    with monkeypatch.context() as m:
        StopAfter(m, signal.SIGTERM, "finetune", 1, 1)
        with pytest.raises(checkpoint.Interrupted):
            run(cfg, tmp_path)
    return tmp_path, cfg


def test_a_tampered_checkpoint_is_refused(stopped_run):
    out, cfg = stopped_run
    path = out / checkpoint.FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the weights
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="is corrupt: its contents do not match the digest"):
        run(cfg, out)
    assert not (out / "summary.json").exists()


def test_a_truncated_checkpoint_is_refused_by_the_cli(stopped_run):
    out, _ = stopped_run
    path = out / checkpoint.FILE
    path.write_bytes(path.read_bytes()[:1000])
    proc = run_cli("schedule=iterative", "schedule.rounds=2", "train.finetune_epochs=2", "sparsity=0.75",
                   "dataset=synthetic", "train.pretrain_epochs=1", "train.eval_every_epoch=false",
                   f"hydra.run.dir={out}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {path} is corrupt")
    assert not (out / "summary.json").exists()


class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/prunebench-pwned",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    buffer = io.BytesIO()
    torch.save({"format": 1, "evil": Payload()}, buffer)
    write_payload(tmp_path / checkpoint.FILE, buffer.getvalue())  # a valid digest: only weights_only stops it
    with pytest.raises(checkpoint.CheckpointError, match="cannot be loaded safely"):
        run(small(), tmp_path)
    assert not Path("/tmp/prunebench-pwned").exists()


def test_another_configurations_checkpoint_is_refused(stopped_run):
    out, _ = stopped_run
    with pytest.raises(checkpoint.CheckpointError, match=r"another configuration \(seed: 0 -> 1\)"):
        run(small("seed=1"), out)


def test_a_full_disk_is_a_clear_error_and_no_result(monkeypatch, tmp_path):
    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", no_space)
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device"):
        run(small(), tmp_path)
    assert not (tmp_path / "summary.json").exists()
    assert not list(tmp_path.glob(".*.tmp"))  # no half-written file left behind


def test_an_unwritable_run_directory_is_one_line_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_cli("dataset=synthetic", f"hydra.run.dir={blocker}/run")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: hydra.run.dir={blocker}/run cannot be written: Not a directory"


def test_one_run_directory_one_process(tmp_path):
    with run_directory(tmp_path):
        with pytest.raises(checkpoint.CheckpointError, match="another prunebench process is running"):
            run(small(), tmp_path)
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.slow
def test_parallel_sweep_jobs_write_only_their_own_directories(tmp_path):
    proc = run_cli("-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2", "dataset=synthetic",
                   "train.pretrain_epochs=2", "train.finetune_epochs=1", "seed=0,1,0", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / ".hydra").exists())
    assert len(jobs) == 3  # seed=0 twice: two jobs, two directories
    for job in jobs:
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        summary = read_summary(job)
        assert f"seed={summary['seed']}" in overrides
        assert {e["event"] for e in events(job)} >= {"dense", "round"}
        assert sum(e["event"] == "dense" for e in events(job)) == 1  # one run's events, not two
    seeds = [read_summary(j)["seed"] for j in jobs]
    assert sorted(seeds) == [0, 0, 1]
    assert without_timings(read_summary(jobs[0])) == without_timings(read_summary(jobs[2]))  # same seed


def test_eigendamage_cannot_checkpoint_its_rewritten_net_so_it_redoes_the_round(monkeypatch, tmp_path):
    cfg = make_config("model=lenet5", "criterion=eigendamage", "granularity=filter", "criterion.samples=32",
                      "sparsity=0.9", "train.finetune_epochs=2", "latency.repeats=0")
    reference = run(cfg, tmp_path / "reference")
    with monkeypatch.context() as m:
        StopAfter(m, signal.SIGTERM, "finetune", 1, 1)
        with pytest.raises(checkpoint.Interrupted):
            run(cfg, tmp_path / "stopped")
    assert checkpoint_of(tmp_path / "stopped")["where"] == "pretrained"  # nothing saved inside the round
    assert without_wall_clock(run(cfg, tmp_path / "stopped")) == without_wall_clock(reference)


def test_a_checkpoint_of_another_format_is_refused(tmp_path):
    buffer = io.BytesIO()
    torch.save({"format": checkpoint.FORMAT + 1, "where": "pretrained"}, buffer)
    write_payload(tmp_path / checkpoint.FILE, buffer.getvalue())
    with pytest.raises(checkpoint.CheckpointError, match=f"format {checkpoint.FORMAT + 1}, and this prunebench "
                                                         f"reads format {checkpoint.FORMAT}"):
        run(small(), tmp_path)


def test_a_run_recorded_before_options_were_added_is_still_the_same_run(tmp_path):
    """A finished run whose config predates curvature/deterministic/tf32 is reported, not refused
    or run again (a sweep goes on across an upgrade); a changed new option is another run."""
    cfg = small()
    first = run(cfg, tmp_path)
    summary = read_summary(tmp_path)
    for key in checkpoint.ADDED_OPTIONS:
        del summary["config"][key]
    del summary["config"]["train"]["epochs"], summary["config"]["criterion"]["prunes_at"]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert run(cfg, tmp_path)["seconds_total"] == first["seconds_total"]
    with pytest.raises(checkpoint.CheckpointError, match="tf32: True -> False"):
        run(small("tf32=false"), tmp_path)
