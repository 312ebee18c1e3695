"""imagefolder over several ranks: each rank reads only the evaluation batches it evaluates, and
each rank's random transforms draw from a stream of its own (one process draws what it always did)."""

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from test_data import make_image_folders
from test_distributed import free_port
from torch import nn
from torch.utils.data import DataLoader

import prunebench.core.distributed as d
from prunebench.data import build_dataset
from prunebench.config.options import ImageFolderConfig


def folder_data(root, workers=0, augment=False):
    cfg = ImageFolderConfig(name="imagefolder", image_size=32, resize=36, workers=workers, augment=augment)
    return build_dataset(cfg, str(root))


def count_decodes(data, split="test"):
    """The paths the split's image loader opens, in a list (workers=0: in this process)."""
    base = data.splits[split].base
    opened, load = [], base.loader
    base.loader = lambda path: (opened.append(path), load(path))[1]
    return opened


def as_rank(monkeypatch, rank, size=2):
    monkeypatch.setattr(d, "_WORLD", d.World(rank, size, rank))


# ------------------------------------------------------------------------------ evaluation
def test_each_rank_reads_the_evaluation_batches_it_evaluates(tmp_path, monkeypatch):
    make_image_folders(tmp_path, test_per_class=7)  # 14 images: batches of 3, 3, 3, 3, 2
    whole = list(folder_data(tmp_path).eval_batches("test", 3))
    for rank in (0, 1):
        as_rank(monkeypatch, rank)
        data = folder_data(tmp_path)
        opened = count_decodes(data)
        got = list(data.eval_batches("test", 3))
        assert len(got) == len(whole) == 5  # evaluate() sees every batch index
        for i, (x, y) in enumerate(got):
            if i % 2 == rank:
                assert torch.equal(x, whole[i][0]) and torch.equal(y, whole[i][1])
            else:
                assert x.shape == (0, 3, 32, 32) and y.shape == (0,)
        mine = sum(len(whole[i][1]) for i in range(5) if i % 2 == rank)
        assert len(opened) == mine == (3 + 3 + 2 if rank == 0 else 3 + 3)  # of 14: each its share, no more


def _evaluate_worker(rank: int, port: int, root: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    d.init()
    data = folder_data(root)
    opened = count_decodes(data)
    r = evaluate_tiny_model(data)
    results.put((rank, (r.correct, r.total, r.loss), len(opened)))
    torch.distributed.destroy_process_group()


def evaluate_tiny_model(data):
    from prunebench.training.evaluate import evaluate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2))
    return evaluate(model, data.eval_batches("test", 2))


def test_two_gloo_ranks_evaluate_the_whole_test_set_as_one_process(tmp_path):
    make_image_folders(tmp_path, test_per_class=9)  # 18 images, 9 batches of 2
    one = evaluate_tiny_model(folder_data(tmp_path))
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_evaluate_worker, args=(r, port, str(tmp_path), results)) for r in range(2)]
    for p in procs:
        p.start()
    got = {rank: (res, n) for rank, res, n in (results.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
    for res, _ in got.values():  # the sums over both ranks, on each
        assert res[:2] == (one.correct, one.total) == (one.correct, 18)
        assert res[2] == pytest.approx(one.loss, rel=1e-9)
    assert (got[0][1], got[1][1]) == (5 * 2, 4 * 2)  # batches 0,2,4,6,8 | 1,3,5,7


# ------------------------------------------------------------------------------ augmentation
def make_same_pattern_folders(root, per_class=8):
    """Every training image the same noise picture: outputs then differ only by crop and flip."""
    pattern = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    for split, n in (("train", per_class), ("val", 1)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pattern.save(root / split / cls / f"{i}.png")


def epoch(data, seed, rank_shard):
    torch.manual_seed(123)  # workers=0 without ranks: the transforms draw from the global generator
    return [x for x, _ in data.train_batches(8, torch.Generator().manual_seed(seed), rank_shard=rank_shard)]


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_draw_their_own_crops_and_flips_reproducibly(tmp_path, monkeypatch, workers):
    make_same_pattern_folders(tmp_path)  # 16 images: 2 batches of 8, shards of 4
    data = folder_data(tmp_path, workers, augment=True)
    seeded = torch.manual_seed(123).get_state()
    shards = {}
    for rank in (0, 1):
        as_rank(monkeypatch, rank)
        shards[rank] = epoch(data, 5, rank_shard=True)
        # nor did the epoch draw from this process's global stream, which stays equal on every rank
        assert torch.equal(torch.get_rng_state(), seeded)
        again = epoch(data, 5, rank_shard=True)
        assert all(torch.equal(a, b) for a, b in zip(shards[rank], again))  # reproducible
    for a, b in zip(shards[0], shards[1]):  # the same places of a global batch: other crops
        assert a.shape == b.shape == (4, 3, 32, 32)
        assert not any(torch.equal(a[j], b[j]) for j in range(4))
    # without rank_shard (pruning scores), every rank still draws the same batches
    as_rank(monkeypatch, 0)
    scored = epoch(data, 5, rank_shard=False)
    as_rank(monkeypatch, 1)
    assert all(torch.equal(a, b) for a, b in zip(scored, epoch(data, 5, rank_shard=False)))


@pytest.mark.parametrize("workers", [0, 2])
def test_one_process_draws_what_the_plain_loader_draws(tmp_path, workers):
    """One process: the batches and augmentations of a shuffled DataLoader on the same seed (the
    loader before ranks existed), whether or not rank_shard is asked for."""
    make_same_pattern_folders(tmp_path)
    data = folder_data(tmp_path, workers, augment=True)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=torch.Generator().manual_seed(5)))
    torch.manual_seed(123)
    plain = [x for x, _ in DataLoader(data.splits["train"], batch_size=8, shuffle=True, num_workers=workers,
                                      generator=torch.Generator().manual_seed(seed))]
    for rank_shard in (False, True):
        got = epoch(data, 5, rank_shard)
        assert len(got) == len(plain) == 2 and all(torch.equal(a, b) for a, b in zip(got, plain))
