import csv

import pytest
from conftest import FAST, make_config, read_summary, run_cli, without_timings

from prunebench.data.mnist import candidate_dirs, find_file

ROUND_KEYS = {"round", "target_sparsity", "sparsity", "compression", "params_remaining", "test_acc_pruned",
              "test_acc", "test_loss", "score_seconds", "train_seconds"}


def test_cli_run_writes_the_run_directory(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*FAST, "criterion=random", "sparsity=0.5", "seed=3", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    for name in ("summary.json", "metrics.jsonl", "layers.csv", "curve.png", "model.pt", "masks.pt",
                 ".hydra/config.yaml", "prunebench.log"):
        assert (out / name).exists(), name
    summary = read_summary(out)
    assert summary["status"] == "completed" and summary["criterion"] == "random" and summary["seed"] == 3
    assert isinstance(summary["dense_test_acc"], float)
    assert ROUND_KEYS <= set(summary["final"])
    assert abs(summary["final"]["sparsity"] - 0.5) * summary["prunable_total"] <= 1
    layers = list(csv.DictReader(open(out / "layers.csv")))
    final_nonzero = sum(int(r["nonzero"]) for r in layers if r["round"] == "1")
    assert final_nonzero == summary["final"]["prunable_remaining"]
    assert "acc final" in proc.stdout  # the closing table


@pytest.mark.slow
def test_same_seed_same_numbers_different_seed_different_numbers(tmp_path):
    args = [*FAST, "schedule=iterative", "schedule.rounds=2", "retrain=rewind"]
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        proc = run_cli(*args, f"seed={seed}", f"hydra.run.dir={tmp_path / name}")
        assert proc.returncode == 0, proc.stderr
    a, b, c = (without_timings(read_summary(tmp_path / n)) for n in "abc")
    assert a == b
    assert a["final"]["test_loss"] != c["final"]["test_loss"]


@pytest.mark.parametrize("args,message", [
    (["sparsity=1.5"], "sparsity must be in [0, 1), got 1.5"),
    (["sparsity=-0.1"], "sparsity must be in [0, 1), got -0.1"),
    (["criterion=nonsense"], "criterion=nonsense is not an option; criterion is one of: angular, block_influence, "
                             "eigendamage, flap, frequency, grasp,"),
    (["schedule=iterative", "schedule.rounds=0"], "schedule.rounds must be >= 1"),
    (["protocol=wanda"], "protocol=wanda sets how language models are evaluated"),
    (["retrain=rewind", "retrain.rewind_epoch=3"], "retrain.rewind_epoch=3 is beyond the pretraining"),
    (["dataset=fashion_mnist", "data_dir=/nonexistent", "dataset.system_dir=null"],
     "Fashion-MNIST not found"),
])
def test_bad_input_stops_with_one_clear_line(tmp_path, args, message):
    out = tmp_path / "run"
    proc = run_cli(*FAST, *args, f"hydra.run.dir={out}")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (out / "summary.json").exists()
    assert not (out / "metrics.jsonl").exists()  # stopped before any work


def test_help_lists_the_groups_and_their_options():
    from prunebench.cli import config_groups

    proc = run_cli("--help")
    assert proc.returncode == 0
    groups = config_groups()
    assert {"model", "dataset", "criterion", "granularity", "retrain", "schedule", "train"} <= set(groups)
    for group, options in groups.items():
        assert f"{group}: {', '.join(options)}" in proc.stdout
    assert "snip" in groups["criterion"] and "resnet20" in groups["model"] and "cifar10" in groups["dataset"]


fashion_mnist_present = find_file("train-images-idx3-ubyte", candidate_dirs("data")) is not None


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(not fashion_mnist_present, reason="Fashion-MNIST not installed (dataset-fashion-mnist)")
def test_default_run_on_fashion_mnist(tmp_path):
    """The README's default command, shortened to one epoch each way."""
    proc = run_cli("train.pretrain_epochs=1", "train.finetune_epochs=1", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    summary = read_summary(tmp_path)
    assert summary["dataset"] == "fashion_mnist" and summary["test_examples"] == 10_000
    assert summary["prunable_total"] == 266_200
    assert summary["dense_test_acc"] > 0.80
    assert abs(summary["final"]["sparsity"] - 0.9) * 266_200 <= 1
    assert summary["final"]["test_acc"] > 0.80


def test_layer_rates_take_new_keys_on_the_command_line_and_unknown_layers_are_named(tmp_path):
    """Hydra's own answer would be "Key 'nonexistent' is not in struct ... use +"."""
    proc = run_cli("dataset=synthetic", "schedule=iterative", "schedule.rounds=null", "schedule.rate=0.2",
                   "criterion.scope=layer", "criterion.layer_rates={nonexistent: 0.2}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("error: criterion.layer_rates keys match no prunable layer: "
                                                    "nonexistent (layers: fc1, fc2, fc3)")
    assert make_config("experiment=lth_lenet300", "criterion.layer_rates={fc2: 0.3}").criterion.layer_rates == \
        {"fc3": 0.1, "fc2": 0.3}


HEAVY = ("torch", "torchvision", "torch_pruning", "wandb", "matplotlib", "submitit")


@pytest.mark.parametrize("args, code, message", [
    (["--help"], 0, None),
    (["criterion=snipp"], 2, "criterion=snipp is not an option"),
    (["sparsity=1.5"], 2, "sparsity must be in [0, 1), got 1.5"),
    (["criterion=obd", "criterion.samples=0"], 2, "criterion.samples must be >= 1, got 0"),
    (["model=resnet20", "model.shortcut=C"], 2, "model.shortcut"),
    (["criterion.foo=1"], 2, "error: Could not override 'criterion.foo': Key 'foo' not in 'MagnitudeConfig'"),
    (["latency.sparse=maybe"], 2, "Value 'maybe' is not a valid bool"),
])
def test_a_wrong_option_or_help_is_answered_before_torch_is_imported(args, code, message, tmp_path):
    """What `prunebench` imports before it answers: nothing heavy (so it answers in well under a
    second, while importing torch alone takes seconds)."""
    import subprocess
    import sys

    probe = ("import atexit, sys; atexit.register(lambda: print('LOADED', sorted(m for m in sys.modules "
             f"if m.split('.')[0] in {HEAVY!r}), file=sys.stderr)); "
             f"sys.argv = ['prunebench', *{args!r}, 'hydra.run.dir={tmp_path}']; "
             "from prunebench.cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "LOADED []"
    if message:
        assert message in proc.stderr and "Traceback" not in proc.stderr
    else:
        assert "== Configuration groups ==" in proc.stdout and "criterion:\n  name: magnitude" in proc.stdout


def test_every_option_file_has_its_implementation_and_schema():
    """conf/<group>/<name>.yaml, the registry entry and the options class agree, for every name."""
    from hydra.core.config_store import ConfigStore

    from prunebench.criteria import CRITERIA
    from prunebench.data import DATASETS
    from prunebench.core.granularity import GRANULARITIES
    from prunebench.models import MODELS
    from prunebench.config.options import OPTIONS, TEXT_DATASETS, options_of
    from prunebench.retrain import POLICIES
    from prunebench.cli import config_groups
    from prunebench.config import RECOVERIES

    groups = config_groups()
    # text datasets and hf_causal_lm load through lm/ (text.py, hub.py), not the image registries
    registries = {"criterion": set(CRITERIA), "retrain": set(POLICIES), "dataset": set(DATASETS) | set(TEXT_DATASETS),
                  # torchvision: any of its models, by model.name
                  "model": set(MODELS) | {"torchvision", "hf_causal_lm"}, "granularity": set(GRANULARITIES),
                  "recovery": set(RECOVERIES), "allocation": {"uniform", "owl"}}
    for group, names in registries.items():
        assert set(groups[group]) == names, group
        for name in names:
            assert ConfigStore.instance().load(f"{group}_{name}_schema.yaml").node._metadata.object_type \
                is options_of(group, name)
    for key in OPTIONS:  # no options class for a name that does not exist
        group, name = key.split("_", 1)
        assert name in registries[group], key
    assert all(CRITERIA[n].config_class is options_of("criterion", n) for n in CRITERIA)
