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
    from prunebench.core.masks import Masks
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


def test_lth_lenet300_prunes_hidden_layers_at_20_and_the_output_at_10_percent_per_round(tmp_path):
    from prunebench.pipeline import build

    exp = build(make_config("experiment=lth_lenet300", "dataset=synthetic", fast=False))
    assert len(exp.targets) == 15 and exp.cfg.retrain.name == "rewind" and exp.cfg.retrain.rewind_epoch == 0
    last = exp.targets[-1]
    assert last["fc1.weight"] == pytest.approx(1 - 0.8 ** 15) and last["fc3.weight"] == pytest.approx(1 - 0.9 ** 15)
    # two rounds, run: each layer lands on its own sparsity
    cfg = make_config("experiment=lth_lenet300", "dataset=synthetic", "dataset.num_train=256", "dataset.num_test=64",
                      "sparsity=0.36", "train.pretrain_epochs=1", "train.finetune_epochs=1", fast=False)
    summary = run(cfg, tmp_path)
    assert len(summary["rounds"]) == 2 and summary["sparsity_requested"] is None
    import csv

    with open(tmp_path / "layers.csv") as f:
        density = {r["layer"]: float(r["density"]) for r in csv.DictReader(f) if r["round"] == "2"}
    assert density["fc1.weight"] == pytest.approx(0.64, abs=1e-5)
    assert density["fc3.weight"] == pytest.approx(0.81, abs=1e-3)


def test_lth_conv4_rates_follow_the_layer_type():
    from prunebench.pipeline import build

    exp = build(make_config("experiment=lth_conv4", "dataset=synthetic", "dataset.shape=[3,32,32]", fast=False))
    last = exp.targets[-1]
    assert len(exp.targets) == 11
    assert last["conv1.weight"] == pytest.approx(1 - 0.9 ** 11) and last["conv4.weight"] == pytest.approx(1 - 0.9 ** 11)
    assert last["fc1.weight"] == pytest.approx(1 - 0.8 ** 11) and last["fc3.weight"] == pytest.approx(1 - 0.9 ** 11)


def test_han_lenet300_thresholds_each_layer_with_its_own_quality():
    cfg = make_config("experiment=han_lenet300", fast=False)
    assert cfg.criterion.name == "magnitude_std" and cfg.schedule.rounds == 3
    assert cfg.criterion.layer_quality == {"fc1.weight": 1.75, "fc2.weight": 1.70, "fc3.weight": 1.13}
    assert cfg.train.finetune_lr == pytest.approx(cfg.train.lr / 10)


def test_every_preset_composes():
    from importlib import resources

    names = sorted(f.name[:-5] for f in resources.files("prunebench.conf").joinpath("experiment").iterdir()
                   if f.name.endswith(".yaml"))
    assert len(names) >= 13
    for name in names:
        make_config(f"experiment={name}", fast=False)


@pytest.mark.parametrize("retrain", ["retain", "rewind", "reinit", "sign_reinit", "isometry"])
def test_every_preset_takes_any_retrain_policy_as_its_control(retrain):
    """experiment=lth_lenet300 retrain=reinit (the paper's control) composes: a preset sets no
    option that only one policy has. A policy the preset's criterion cannot take is a ConfigError."""
    from importlib import resources

    from prunebench.config import ConfigError

    names = sorted(f.name[:-5] for f in resources.files("prunebench.conf").joinpath("experiment").iterdir()
                   if f.name.endswith(".yaml"))
    for name in names:
        try:
            make_config(f"experiment={name}", f"retrain={retrain}", fast=False)
        except ConfigError:
            pass  # refused with one line, e.g. EigenDamage needs retrain=retain
