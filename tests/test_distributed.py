"""One run over several processes (torchrun, gloo on this CPU): the same run as one process with
the same global batch, rank 0 writing the run directory, resuming, and the refusals."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import read_summary, run_cli

from prunebench.core.distributed import DistributedError, check_same, digest

FAST = ["dataset=synthetic", "dataset.num_train=960", "dataset.num_test=256", "train.pretrain_epochs=2",
        "train.finetune_epochs=1", "latency.repeats=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc=2, wait=True):
    """`torchrun --nproc_per_node=N -m prunebench ARGS` in a subprocess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "-m", "prunebench", *args]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def same_run(one: Path, two: Path) -> None:
    """Masks identical, accuracy within 1e-3, weights within float-reduction tolerance."""
    a, b = torch.load(one / "masks.pt"), torch.load(two / "masks.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    s1, s2 = read_summary(one), read_summary(two)
    assert abs(s1["final"]["test_acc"] - s2["final"]["test_acc"]) <= 1e-3
    assert abs(s1["dense_test_acc"] - s2["dense_test_acc"]) <= 1e-3
    m1, m2 = torch.load(one / "model.pt"), torch.load(two / "model.pt")
    assert max(float((m1[k] - m2[k]).abs().max()) for k in m1) < 1e-3


@pytest.mark.parametrize("criterion", ["magnitude", pytest.param("snip", marks=pytest.mark.slow),
                                       pytest.param("obs", marks=pytest.mark.slow)])
def test_two_processes_compute_the_one_process_run(tmp_path, criterion):
    args = [*FAST, f"criterion={criterion}", "sparsity=0.8"]
    if criterion == "obs":
        args += ["criterion.samples=64", "criterion.block_size=64"]
    one = run_cli(*args, f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    two = torchrun(*args, f"hydra.run.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    same_run(tmp_path / "one", tmp_path / "two")
    assert (read_summary(tmp_path / "one")["processes"], read_summary(tmp_path / "two")["processes"]) == (1, 2)
    files = {p.name for p in (tmp_path / "two").iterdir()}
    assert "summary.json" in files and not any("rank" in f for f in files)  # rank 0 alone wrote here
    log = (tmp_path / "two" / "prunebench.log").read_text()
    assert log.count("dense: test acc") == 1  # one rank's log lines, not two


def _mismatch_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    import prunebench.core.distributed as d

    d.init()
    try:
        check_same("masks", {"fc1.weight": torch.ones(3)})  # equal: passes
        check_same("masks", {"fc1.weight": torch.full((3,), float(rank))})
        results.put((rank, "no error"))
    except DistributedError as e:
        results.put((rank, str(e)))
    torch.distributed.destroy_process_group()


def on_two_ranks(worker) -> dict:
    """rank -> what `worker(rank, port, results)` put in `results`, run in 2 spawned gloo processes."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = {rank: rest[0] if len(rest) == 1 else rest for rank, *rest in (results.get(timeout=60) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
    return got


def test_masks_that_differ_between_ranks_stop_the_run_on_every_rank():
    got = on_two_ranks(_mismatch_worker)
    assert all("rank(s) [1] differ from rank 0's" in got[r] for r in (0, 1)), got


def _collectives_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    import prunebench.core.distributed as d

    d.init()
    bn = torch.nn.BatchNorm2d(3)
    bn.running_mean.fill_(float(rank))  # rank 0: 0, rank 1: 1
    bn.running_var.fill_(1.0 + 2 * rank)
    d.average_norm_statistics(torch.nn.Sequential(bn))
    grid = torch.full((4, 4), float(rank))
    d.broadcast_from_main([grid[:, 1], grid[2]])  # a strided and a contiguous view
    results.put((rank, bn.running_mean.tolist(), bn.running_var.tolist(), grid.tolist()))
    torch.distributed.destroy_process_group()


def test_ranks_average_their_norm_statistics_and_take_rank_0s_broadcasts():
    got = on_two_ranks(_collectives_worker)
    for rank in (0, 1):
        mean, var, grid = got[rank]
        assert mean == [0.5] * 3 and var == [2.0] * 3
        expected = [[0.0] * 4 if i == 2 else [float(rank), 0.0, float(rank), float(rank)] for i in range(4)]
        assert grid == expected


@pytest.mark.parametrize("model", ["resnet20", pytest.param("vgg11", marks=pytest.mark.slow)])
def test_a_batch_norm_model_trains_and_prunes_over_two_processes(tmp_path, model):
    """DDP leaves each rank with its own shard's batch-norm statistics; they are averaged at each
    epoch's end, so the ranks evaluate, prune and pass the weight digests alike."""
    args = ["dataset=synthetic", "dataset.num_train=256", "dataset.num_test=64", "dataset.shape=[3,16,16]",
            f"model={model}", "train.batch_size=64", "train.pretrain_epochs=2", "train.finetune_epochs=1",
            "latency.repeats=0", "sparsity=0.8"]
    two = torchrun(*args, f"hydra.run.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    summary = read_summary(tmp_path / "two")
    assert summary["processes"] == 2 and abs(summary["final"]["sparsity"] - 0.8) < 1e-3
    # (not the one-process numbers: without train.sync_bn each rank normalises by its own shard's
    # statistics while training, so the gradients are not the global batch's)
    state = torch.load(tmp_path / "two" / "model.pt")
    assert any(k.endswith("running_var") for k in state)


NOISY_SCORES = """
import sys
import torch
import prunebench.criteria.magnitude as magnitude
from prunebench.core.distributed import world
from prunebench.cli import main

score = magnitude.Magnitude.score


def noisy(self, ctx):  # what a GPU may do: scores that differ between ranks in their last bits
    gen = torch.Generator().manual_seed(1000 + world().rank)
    return {n: s * (1 + 1e-3 * torch.randn(s.shape, generator=gen)) for n, s in score(self, ctx).items()}


magnitude.Magnitude.score = noisy
sys.argv[0] = "prunebench"
main()
"""


def test_ranks_whose_scores_differ_in_the_last_bits_prune_alike(tmp_path):
    script = tmp_path / "noisy.py"
    script.write_text(NOISY_SCORES)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(script), *FAST, "sparsity=0.8", f"hydra.run.dir={tmp_path / 'run'}"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert abs(read_summary(tmp_path / "run")["final"]["sparsity"] - 0.8) < 1e-3


def test_digest_depends_on_every_value_and_name():
    base = {"a": torch.zeros(4), "b": torch.ones(2)}
    assert digest(base) == digest({"b": torch.ones(2), "a": torch.zeros(4)})
    assert digest(base) != digest({"a": torch.zeros(4), "b": torch.tensor([1.0, 0.0])})
    assert digest(base) != digest({"a": torch.zeros(4), "c": torch.ones(2)})


@pytest.mark.parametrize("args,message", [
    (["train.batch_size=61"], "does not split into 2 equal shards"),
    pytest.param(["dataset.num_train=961"], "the last batch of an epoch holds 1 examples, fewer than the 2 processes",
                 marks=pytest.mark.slow),
    pytest.param(["schedule=gradual", "train.pretrain_epochs=8"], "schedule=gradual changes masks inside training",
                 marks=pytest.mark.slow),
    pytest.param(["model=resnet20", "train.sync_bn=true", "dataset.shape=[3,32,32]"], "train.sync_bn needs GPUs",
                 marks=pytest.mark.slow),
])
def test_what_a_distributed_run_cannot_do_is_refused_once(tmp_path, args, message):
    r = torchrun(*FAST, "train.batch_size=64", *args, f"hydra.run.dir={tmp_path}")
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr[-2000:]
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.slow
def test_a_sweep_under_torchrun_is_refused(tmp_path):
    r = torchrun("-m", "seed=0,1", *FAST, f"hydra.sweep.dir={tmp_path}")
    assert r.returncode != 0 and "a sweep (-m) under torchrun" in r.stderr


def descendants(parent: int):
    children = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(pid))
    todo, out = [parent], []
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def rank_pid(parent: int, rank: int) -> int:
    """The pid of the worker with RANK=rank among `parent`'s descendants (torchrun's workers)."""
    for _ in range(400):
        for pid in descendants(parent):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank}")


@pytest.mark.slow
def test_a_run_whose_rank_is_killed_resumes_to_the_same_result(tmp_path):
    args = [*FAST, "train.pretrain_epochs=6", "checkpoint.every_epochs=1", "sparsity=0.8"]
    whole = torchrun(*args, f"hydra.run.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-2000:]
    run_dir = tmp_path / "killed"
    proc = torchrun(*args, f"hydra.run.dir={run_dir}", wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "checkpoint.pt").exists():
        time.sleep(0.05)
    assert (run_dir / "checkpoint.pt").exists(), "no checkpoint written"
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and not (run_dir / "summary.json").exists()
    ours = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and ours[0].startswith("error: rank 0: lost contact with another process"), err[-3000:]
    assert "to resume from its last checkpoint: torchrun --nproc_per_node=2 -m prunebench" in ours[0]
    assert "prunebench/" not in err.split("error: rank 0")[0]  # no traceback of ours before it
    again = torchrun(*args, f"hydra.run.dir={run_dir}")
    assert again.returncode == 0, again.stderr[-2000:]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(e["event"] == "resumed" for e in events)
    same_run(tmp_path / "whole", run_dir)


@pytest.mark.slow
def test_workers_end_when_torchrun_is_killed_and_the_rerun_resumes(tmp_path):
    """torchrun puts its workers in sessions of their own: killing it with SIGKILL must not leave
    them running (holding the run directory) to the end."""
    args = ["dataset=synthetic", "dataset.num_train=9600", "train.pretrain_epochs=30", "checkpoint.every_epochs=1",
            "latency.repeats=0", f"hydra.run.dir={tmp_path}"]
    proc = torchrun(*args, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "checkpoint.pt").exists():
        time.sleep(0.05)
    workers = [rank_pid(proc.pid, r) for r in (0, 1)]
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers), "workers outlived their launcher"
    again = torchrun(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in (tmp_path / "prunebench.log").read_text()


def test_a_run_directory_in_use_is_refused_in_one_line_by_every_rank(tmp_path):
    import fcntl

    with open(tmp_path / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a still-running run of this directory holds it
        r = torchrun(*FAST, f"hydra.run.dir={tmp_path}")
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert ours == [f"error: another prunebench process is running in {tmp_path}; give this run its own directory "
                    f"(hydra.run.dir=...)"], r.stderr[-3000:]
    assert "prunebench/" not in r.stderr.split(ours[0])[0]


def test_ranks_other_than_0_write_no_checkpoint(tmp_path, monkeypatch):
    """Every rank resumes from rank 0's file: the others' copies would cost a full write (and an
    fsync) per epoch for nothing."""
    import prunebench.core.distributed as d
    from prunebench.runs.checkpoint import RunCheckpoints

    monkeypatch.setattr(d, "_WORLD", d.World(1, 2, 1))
    checkpoints = RunCheckpoints(tmp_path, {}, 1, None, {}, None, 0.0, "cpu")
    checkpoints.save("pretrain epoch 1", progress=None)  # returns before it reads anything
    assert not list(tmp_path.iterdir()) and checkpoints.writes == []


def test_device_cuda_n_under_torchrun_is_refused(monkeypatch):
    import prunebench.core.distributed as d
    from prunebench.config import ConfigError
    from prunebench.core.device import resolve_device

    monkeypatch.setattr(d, "_WORLD", d.World(1, 2, 1))
    with pytest.raises(ConfigError, match="device=cuda:1 under torchrun would put every rank on that one GPU"):
        resolve_device("cuda:1")


def test_the_resnet50_imagenet_preset_carries_openlths_recipe():
    from conftest import make_config

    cfg = make_config("experiment=lth_resnet50_imagenet", fast=False)
    t = cfg.train
    assert (cfg.model.name, cfg.dataset.name, cfg.criterion.name, cfg.retrain.name) == \
        ("resnet50", "imagefolder", "magnitude", "rewind")
    assert (t.optimizer, t.momentum, t.lr, t.batch_size, t.weight_decay) == ("sgd", 0.9, 0.4, 1024, 1e-4)
    assert (t.warmup_epochs, list(t.lr_milestones), t.lr_gamma, t.pretrain_epochs) == (5, [30, 60, 80], 0.1, 90)
    assert len(cfg.schedule.targets(cfg.sparsity)) == 10 and cfg.schedule.rate == 0.2


def test_rank_batches_cut_the_single_process_batches_between_the_ranks(monkeypatch):
    """imagefolder's per-rank batch sampler: the ranks' parts of each batch put together are the
    batch one process would load (the same seeded order as DataLoader's shuffle)."""
    import prunebench.core.distributed as d
    from prunebench.data.imagefolder import RankBatches

    whole = list(RankBatches(23, 8, torch.Generator().manual_seed(5)))
    assert whole == [b.tolist() for b in torch.randperm(23, generator=torch.Generator().manual_seed(5)).split(8)]
    parts = []
    for rank in range(3):
        monkeypatch.setattr(d, "_WORLD", d.World(rank, 3, rank))
        parts.append(list(RankBatches(23, 8, torch.Generator().manual_seed(5))))
    assert [sum((p[i] for p in parts), []) for i in range(len(whole))] == whole
    assert [len(p[0]) for p in parts] == [3, 3, 2] and [len(p[-1]) for p in parts] == [3, 2, 2]


@pytest.mark.slow
def test_imagefolder_ranks_read_their_shards_and_compute_the_one_process_run(tmp_path):
    from test_data import make_image_folders

    make_image_folders(tmp_path / "images", train_per_class=16, test_per_class=4)
    args = ["dataset=imagefolder", f"data_dir={tmp_path / 'images'}", "dataset.image_size=32", "dataset.resize=36",
            "dataset.workers=0", "train.batch_size=8", "train.pretrain_epochs=2", "train.finetune_epochs=1",
            "latency.repeats=0", "sparsity=0.5"]
    one = run_cli(*args, f"hydra.run.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun(*args, f"hydra.run.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-2000:]
    same_run(tmp_path / "one", tmp_path / "two")
