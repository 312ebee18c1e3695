"""hydra/launcher=slurm on a real one-node SLURM cluster (Debian's slurmctld, slurmd, munge and
slurmdbd accounting), installed and started by scripts/slurm_cluster.sh when this machine allows
(root, apt), stopped afterwards. Skipped, with the reason, where it cannot run."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_cluster.sh"


def _why_not() -> str:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux to install and start SLURM daemons"
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        return "no SLURM installed and no apt-get to install it"
    return ""


pytestmark = pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "runs")


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
        yield env
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, env=env, timeout=120)


def prunebench(*args, env, **kwargs):
    exe = Path(sys.executable).with_name("prunebench")
    return subprocess.Popen([str(exe), "-m", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1",
                             "hydra.launcher.mem_gb=1", *FAST, "model=lenet300", "dataset.num_train=128",
                             "dataset.num_test=64", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, **kwargs)


def test_a_two_job_sweep_runs_on_slurm_and_reports(cluster, tmp_path):
    proc = prunebench("seed=0,1", f"hydra.sweep.dir={tmp_path}", env=cluster)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    summaries = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/summary.json"))]
    assert [s["seed"] for s in summaries] == [0, 1] and all(s["status"] == "completed" for s in summaries)
    assert "seeds" in (tmp_path / "report.md").read_text()
    job_ids = {p.name for p in (tmp_path / ".submitit").iterdir() if p.is_dir()}
    states = subprocess.run(["sacct", "-n", "-X", "-o", "JobID,State", "-j", ",".join(job_ids)],
                            capture_output=True, text=True, env=cluster).stdout.split()
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
