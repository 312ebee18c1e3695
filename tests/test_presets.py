"""Paper presets (conf/experiment/): each composes, sets what its paper says, and runs shortened."""

import pytest

from conftest import make_config
from prunebench.pipeline import run

PRESETS = {
    "snip_lenet300": ("snip", "lenet300", "mnist", 0.95),
    "snip_lenet5": ("snip", "lenet5", "mnist", 0.98),
    "isometry_lenet5": ("snip", "lenet5", "mnist", 0.9),
    "grasp_vgg19": ("grasp", "vgg19", "cifar10", 0.98),
    "synflow_vgg16": ("synflow", "vgg16", "cifar10", 0.99),
}
TRAINED_PRESETS = {
    "obd_lenet300": ("obd", "lenet300", "fashion_mnist", 0.9),
    "obs_lenet300": ("obs", "lenet300", "fashion_mnist", 0.9),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_composes_with_its_papers_choices(preset):
    criterion, model, dataset, sparsity = PRESETS[preset]
    cfg = make_config(f"experiment={preset}", fast=False)
    assert (cfg.criterion.name, cfg.model.name, cfg.dataset.name, cfg.sparsity) == (criterion, model, dataset, sparsity)
    assert cfg.train.pretrain_epochs == 0  # pruning at initialisation
    assert cfg.train.finetune_epochs >= 100  # the full recipe by default


@pytest.mark.parametrize("preset", sorted(TRAINED_PRESETS))
def test_second_order_presets_prune_a_trained_network_without_retraining(preset):
    cfg = make_config(f"experiment={preset}", fast=False)
    assert (cfg.criterion.name, cfg.model.name, cfg.dataset.name, cfg.sparsity) == TRAINED_PRESETS[preset]
    assert cfg.train.pretrain_epochs > 0 and cfg.train.finetune_epochs == 0


@pytest.mark.parametrize("preset", ["snip_lenet300", "isometry_lenet5"])
def test_preset_runs_shortened_on_synthetic_data(tmp_path, preset):
    cfg = make_config(f"experiment={preset}", "dataset=synthetic", "dataset.num_train=256", "dataset.num_test=64",
                      "dataset.val_size=32",
                      "train.finetune_epochs=1", "retrain.steps=10" if preset.startswith("isometry") else "seed=0",
                      fast=False)
    summary = run(cfg, tmp_path)
    assert abs(summary["final"]["sparsity"] - cfg.sparsity) * summary["prunable_total"] <= 1
    if preset.startswith("isometry"):
        assert "fc1.weight" in summary["final"]["isometry"]
