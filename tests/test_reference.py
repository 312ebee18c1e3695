"""Existing runs keep their numbers: summaries recorded by an earlier commit, compared on the CPU
(timings, versions and the config aside). A change that moves one of these numbers on purpose
regenerates them with PRUNEBENCH_WRITE_REFERENCE=1 and says why in its commit."""

import json
import os
from pathlib import Path

import pytest

from conftest import make_config
from prunebench.pipeline import run

REFERENCE = Path(__file__).parent / "reference" / "summaries.json"
TINY = ["dataset.num_train=256", "dataset.num_test=128", "train.batch_size=32", "latency.repeats=0"]
RUNS = {
    "default": [],
    "iterative_rewind": ["schedule=iterative", "schedule.rounds=2", "retrain=rewind", "retrain.rewind_epoch=1",
                         "train.pretrain_epochs=2"],
    "l1_filters_lenet5": ["model=lenet5", "granularity=filter", "criterion.scope=layer", "sparsity=0.5"],
    "obs": ["criterion=obs", "criterion.block_size=16", "criterion.samples=64"],
    "eigendamage_lenet5": ["model=lenet5", "granularity=filter", "criterion=eigendamage", "sparsity=0.5",
                           "criterion.samples=64"],
    "snip_at_init": ["criterion=snip", "train.pretrain_epochs=0", "train.finetune_epochs=2"],
}
IGNORED = ("seconds", "latency", "speedup", "versions", "config", "threads")


def numbers(obj):
    if isinstance(obj, dict):
        return {k: numbers(v) for k, v in obj.items() if not any(t in k for t in IGNORED)}
    if isinstance(obj, list):
        return [numbers(v) for v in obj]
    return obj


@pytest.mark.parametrize("name", list(RUNS))
def test_summary_equals_the_recorded_one(name, tmp_path):
    got = numbers(run(make_config(*TINY, *RUNS[name]), tmp_path))
    recorded = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {}
    if os.environ.get("PRUNEBENCH_WRITE_REFERENCE"):
        REFERENCE.write_text(json.dumps({**recorded, name: got}, indent=1, sort_keys=True) + "\n")
    assert got == recorded[name]
