"""hydra/launcher=slurm on a real one-node SLURM cluster (Debian's slurmctld, slurmd, munge and
slurmdbd accounting), installed and started by scripts/slurm_cluster.sh when this machine allows
(root, apt), stopped afterwards. Skipped, with the reason, where it cannot run."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, without_timings

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_cluster.sh"


def _why_not() -> str:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux to install and start SLURM daemons"
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        return "no SLURM installed and no apt-get to install it"
    return ""


pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "runs")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "PRUNEBENCH_SLURM_STATE": str(state)}
    installed = subprocess.run(["bash", str(SCRIPT), "install"], capture_output=True, text=True, env=env,
                               timeout=600)
    if installed.returncode != 0:
        pytest.skip(f"could not install SLURM: {installed.stderr.strip()[-300:]}")
    started = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, env=env, timeout=300)
    if started.returncode == 4:
        pytest.skip(started.stderr.strip())
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        fresh_job_ids(env)
        yield env
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, env=env, timeout=120)


def fresh_job_ids(env):
    """Job ids past every job the accounting database holds. The database outlives the cluster, whose
    job ids start at 1 again on each start; submitit asks `sacct -j <id>` right after submitting, and
    where the new job is not recorded yet it reads an old job of the same id: finished, so it waits
    15 s for a result, then fails the sweep while the job still runs (seen with jobs over 15 s)."""
    ids = subprocess.run(["sacct", "-a", "-D", "-X", "-n", "-P", "-S", "2000-01-01", "-o", "JobIDRaw"],
                         capture_output=True, text=True, env=env, check=True).stdout.split()
    first = max((int(i) for i in ids if i.isdigit()), default=0) + 1
    conf = Path(re.search(r"SLURM_CONF\s*=\s*(\S+)", subprocess.run(
        ["scontrol", "show", "config"], capture_output=True, text=True, env=env, check=True).stdout).group(1))
    conf.write_text(re.sub(r"(?m)^FirstJobId=.*\n", "", conf.read_text()) + f"FirstJobId={first}\n")
    subprocess.run(["scontrol", "reconfigure"], env=env, check=True)


JOB = [*FAST, "model=lenet300", "dataset.num_train=128", "dataset.num_test=64"]  # each job's config


def prunebench(*args, env, **kwargs):
    exe = Path(sys.executable).with_name("prunebench")
    return subprocess.Popen([str(exe), "-m", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1",
                             "hydra.launcher.mem_gb=1", *JOB, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, **kwargs)


def test_a_two_job_sweep_runs_on_slurm_and_reports(cluster, tmp_path):
    proc = prunebench("seed=0,1", f"hydra.sweep.dir={tmp_path}", env=cluster)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    summaries = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/summary.json"))]
    assert [s["seed"] for s in summaries] == [0, 1] and all(s["status"] == "completed" for s in summaries)
    assert "seeds" in (tmp_path / "report.md").read_text()
    job_ids = {p.name for p in (tmp_path / ".submitit").iterdir() if p.is_dir()}
    deadline = time.time() + 60  # the launcher returns once each result is written; accounting
    while True:                  # records the job's end when its process has exited, a moment later
        states = subprocess.run(["sacct", "-n", "-X", "-o", "JobID,State", "-j", ",".join(job_ids)],
                                capture_output=True, text=True, env=cluster).stdout.split()
        if "RUNNING" not in states or time.time() > deadline:
            break
        time.sleep(0.5)
    assert states.count("COMPLETED") == 2, states


def test_a_killed_job_fails_the_sweep_instead_of_hanging(cluster, tmp_path):
    proc = prunebench("train.pretrain_epochs=100000", f"hydra.sweep.dir={tmp_path}", env=cluster)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the job runs, then kill it
        running = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i"], capture_output=True, text=True,
                                 env=cluster).stdout.split()
        if running:
            break
        time.sleep(0.5)
    assert running, "the job never started"
    subprocess.run(["scancel", *running], env=cluster, check=True)
    out, _ = proc.communicate(timeout=180)  # accounting reports the job's end: no endless wait
    assert proc.returncode != 0
    assert not list(tmp_path.glob("*/summary.json"))


# eight epochs of about 0.7 s each on one thread: long enough to be signalled mid-training
LONG = ["train.pretrain_epochs=4", "train.finetune_epochs=2", "schedule=iterative", "schedule.rounds=2",
        "dataset.num_train=32768", "seed=0"]


def events(path):
    """metrics.jsonl's events so far (a line being written is left out)."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def tail(path, n=3000):
    return path.read_text(errors="replace")[-n:] if path.is_file() else f"({path.name}: none)"


def test_a_signalled_job_checkpoints_is_requeued_and_resumes_to_the_same_result(cluster, tmp_path):
    """SIGUSR2, what SLURM sends before a time limit (submitit's --signal=USR2@<delay>): the job
    checkpoints at the next mini-batch, submitit requeues it, and the requeued job resumes in the same
    directory and ends as a run never interrupted (on one thread each: OMP_NUM_THREADS=1, which sbatch
    passes on to the job, so that summary.json's `threads` is compared too)."""
    env = {**cluster, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    sweep = tmp_path / "a"
    proc = prunebench(*LONG, "hydra.launcher.mem_gb=2", f"hydra.sweep.dir={sweep}", env=env)
    # the same run on this machine, meanwhile: the reference
    reference = subprocess.Popen([str(Path(sys.executable).with_name("prunebench")), *JOB, *LONG,
                                  f"hydra.run.dir={tmp_path / 'reference'}"], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, env=env)
    job_id, out, released = None, "", False

    def why(message):
        logs = "\n".join(f"--- {p}\n{tail(p)}" for p in sorted(sweep.glob(".submitit/*/*_log.*")))
        kinds = [e["event"] + (f" ({e['where']})" if "where" in e else "") for e in events(metrics)]
        sacct = subprocess.run(["sacct", "-D", "-j", str(job_id), "-o", "JobID,State,ExitCode,Start,End"],
                               capture_output=True, text=True, env=env).stdout if job_id else ""
        return (f"{message}\njob {job_id}; events: {kinds}\n{sacct}--- sweep output\n{out[-3000:]}\n{logs}\n"
                f"--- {metrics.parent / 'prunebench.log'}\n{tail(metrics.parent / 'prunebench.log')}")

    metrics = sweep / "?" / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:  # the first checkpoint: it is training
            found = sorted(sweep.glob("*/metrics.jsonl"))
            metrics = found[0] if found else metrics
            if any(e["event"] == "checkpoint" for e in events(metrics)):
                break
            time.sleep(0.1)
        job_id = next((p.name for p in sweep.glob(".submitit/*") if p.name.isdigit()), None)
        if proc.poll() is not None or job_id is None or time.time() >= deadline:
            out = proc.communicate()[0] if proc.poll() is not None else ""
            pytest.fail(why("the job did not start training (no checkpoint event)"))
        # to the job's steps (srun: the Python process), as SLURM's --signal without B: does; --full would
        # also signal the batch shell, which dies of it and fails the job
        signalled = subprocess.run(["scancel", "--signal=USR2", job_id], capture_output=True, text=True, env=env)
        assert signalled.returncode == 0, signalled.stderr
        # SLURM holds a requeued job back for two minutes (reason BeginTime, set once its first run has
        # ended): start it sooner, but not within the second its first run was stopped in, or slurmd
        # refuses the launch (its credential counts as revoked) and the job fails
        while time.time() < deadline and proc.poll() is None and not released:
            state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True,
                                   env=env).stdout.split()
            if state == ["PENDING", "BeginTime"]:
                time.sleep(2)
                released = subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                                          capture_output=True, text=True, env=env).returncode == 0
            time.sleep(0.1)
        try:
            out = proc.communicate(timeout=max(0.0, deadline - time.time()) + 60)[0]
        except subprocess.TimeoutExpired:
            pytest.fail(why("the sweep did not finish in time"))
        ref_out = reference.communicate(timeout=120)[0]
    finally:
        for p in (proc, reference):
            if p.poll() is None:
                p.kill()
                p.communicate()
        if job_id and proc.returncode != 0:
            subprocess.run(["scancel", job_id], env=env)

    assert released, why("the job was never pending again after SIGUSR2 (not requeued?)")
    assert proc.returncode == 0, why(f"the sweep exited {proc.returncode}")
    job_dir = metrics.parent
    summary = json.loads((job_dir / "summary.json").read_text())
    assert summary["status"] == "completed", why(f"status {summary['status']}")
    assert not (job_dir / "checkpoint.pt").exists(), why("the finished run left its checkpoint")
    # the stop, the checkpoint it wrote, the requeue and the resume from that very checkpoint
    assert "SIGUSR2 received" in (job_dir / "prunebench.log").read_text(), why("the run never saw SIGUSR2")
    assert f"Requeued job {job_id}" in tail(sweep / ".submitit" / job_id / f"{job_id}_0_log.out", 10**6), \
        why("submitit did not requeue the job")
    log = events(job_dir / "metrics.jsonl")
    resumed = [i for i, e in enumerate(log) if e["event"] == "resumed"]
    assert len(resumed) == 1, why("expected one resume")
    # it resumed from the checkpoint written on the signal (whose own event the resumed run's
    # metrics.jsonl rewinds past, with everything after the state it saved), not from an older one
    where = log[resumed[0]]["where"]
    before = [e["where"] for e in log[:resumed[0]] if e["event"] == "checkpoint"]
    assert before and where not in before[:-1], why(f"resumed from {where!r}, an older checkpoint")
    assert f"(saved at {where})" in (job_dir / "prunebench.log").read_text(), why(f"no resume from {where!r}")
    for _ in range(100):  # accounting may lag the job's end by a moment
        states = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", "State"], capture_output=True,
                                text=True, env=env).stdout.split()
        if states == ["REQUEUED", "COMPLETED"]:
            break
        time.sleep(0.2)
    assert states == ["REQUEUED", "COMPLETED"], why(f"sacct --duplicates: {states}")

    # the same numbers as the run never interrupted: every epoch, round and the summary
    assert reference.returncode == 0, ref_out[-3000:]
    expected = json.loads((tmp_path / "reference" / "summary.json").read_text())
    assert summary["threads"] == expected["threads"] == 1
    assert without_timings(summary) == without_timings(expected)
    reference_log = events(tmp_path / "reference" / "metrics.jsonl")

    def progress(records):
        return [without_timings(e) for e in records if e["event"] in ("epoch", "dense", "round")]

    assert progress(log) == progress(reference_log)


def test_a_job_of_two_tasks_is_one_distributed_run(cluster, tmp_path):
    """hydra.launcher.tasks_per_node=2: the job's two tasks are the two ranks of one run (submitit
    sets the rendezvous), which computes what one process computes."""
    args = ["dataset.num_train=256", "seed=0"]
    proc = prunebench(*args, "hydra.launcher.tasks_per_node=2", f"hydra.sweep.dir={tmp_path / 'sweep'}", env=cluster)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    (job,) = [p.parent for p in (tmp_path / "sweep").glob("*/summary.json")]
    log = "\n".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").glob("*/*_0_log.out"))
    alone = subprocess.run([str(Path(sys.executable).with_name("prunebench")), *JOB, *args,
                            f"hydra.run.dir={tmp_path / 'alone'}"], capture_output=True, text=True, env=cluster)
    assert alone.returncode == 0, alone.stderr[-2000:]
    import torch

    a, b = torch.load(job / "masks.pt"), torch.load(tmp_path / "alone" / "masks.pt")
    assert all(torch.equal(a[k], b[k]) for k in a), log[-2000:]
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (job, tmp_path / "alone"))
    assert abs(s1["final"]["test_acc"] - s2["final"]["test_acc"]) <= 1e-3
    assert (s1["processes"], s2["processes"]) == (2, 1)
    assert (job / "prunebench.log").read_text().count("dense: test acc") == 1  # rank 0's lines only
