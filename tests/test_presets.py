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


def _li_selection(preset):
    """The preset's first-round masks on its (untrained) model, without training."""
    from prunebench.criteria import ScoreContext
    from prunebench.masks import Masks
    from prunebench.pipeline import build

    cfg = make_config(f"experiment={preset}", "dataset=synthetic", "dataset.shape=[3,32,32]",
                      "dataset.num_train=64", "dataset.num_test=32", fast=False)
    exp = build(cfg)
    ctx = ScoreContext(exp.model, exp.masks, input_shape=exp.data.input_shape)
    masks: Masks = exp.criterion.prune(ctx, exp.targets[0], exp.granularity)
    kept = {w[:-len(".weight")]: int(exp.granularity.structure.alive(w, masks[w]).sum())
            for w in exp.granularity.structure.producers}
    return cfg, kept


def test_li2017_vgg16_halves_conv1_and_conv8_to_13_only():
    cfg, kept = _li_selection("li2017_vgg16")
    assert (cfg.criterion.name, cfg.granularity.name, cfg.granularity.reduce) == ("magnitude", "filter", "l1")
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    pruned = {1, 8, 9, 10, 11, 12, 13}
    assert kept == {f"conv{i}": w // 2 if i in pruned else w for i, w in enumerate(widths, 1)}
    assert (cfg.train.finetune_epochs, cfg.train.finetune_lr) == (40, 0.001)


def test_li2017_resnet56_prunes_first_convs_by_stage_and_skips_the_sensitive_layers():
    cfg, kept = _li_selection("li2017_resnet56")
    # only the first convolution of each block is a unit producer (the second is tied to the shortcut)
    assert set(kept) == {f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(9)}
    skipped = {"layer1.7.conv1", "layer1.8.conv1", "layer2.0.conv1", "layer2.7.conv1", "layer3.0.conv1",
               "layer3.8.conv1"}
    for name, n in kept.items():
        stage = int(name[5])
        width, ratio = {1: (16, 0.6), 2: (32, 0.3), 3: (64, 0.1)}[stage]
        assert n == (width if name in skipped else width - round(ratio * width)), name


def test_eigendamage_vgg19_follows_the_authors_configuration():
    cfg = make_config("experiment=eigendamage_vgg19", fast=False)
    assert (cfg.criterion.name, cfg.model.name, cfg.dataset.name, cfg.granularity.name) == (
        "eigendamage", "vgg19", "cifar10", "filter")
    assert (cfg.criterion.fisher, cfg.criterion.min_density, cfg.sparsity) == ("true", 0.05, 0.9)
    from prunebench.config import finetune_recipe

    recipe = finetune_recipe(cfg.train)
    assert (cfg.train.finetune_epochs, recipe.lr, recipe.weight_decay, recipe.lr_milestones) == (
        150, 0.001, 1e-4, [75, 112])
    assert cfg.train.weight_decay == 5e-4  # pretraining keeps the CIFAR VGG recipe
