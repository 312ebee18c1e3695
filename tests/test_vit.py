"""Vision Transformers (models/vit.py), their prunable set, and the AdamW + warmup recipe."""

import copy
import csv
import math

import pytest
import torch
from conftest import make_config, read_summary
from torch import nn

from prunebench.config import ConfigError, TrainConfig, finetune_recipe
from prunebench.data import TensorData
from prunebench.core.masks import Masks, prunable_weights
from prunebench.core.metrics import count_macs
from prunebench.models import build_model
from prunebench.config.options import ViTConfig, ViTSmallConfig
from prunebench.pipeline import build, run
from prunebench.training.hooks import Hook
from prunebench.training.loop import fit, make_lr_schedule, make_optimizer

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)
TINY = ["model=vit_tiny", "model.depth=1", "model.width=16"]


def vit(shape=MNIST, classes=10, cls=ViTConfig, **fields):
    return build_model(cls(name="vit_tiny", **fields), shape, classes)


def block_layers(i, kinds=("attention", "mlp")):
    names = {"attention": ["attn.q", "attn.k", "attn.v", "attn.proj"], "mlp": ["mlp.fc1", "mlp.fc2"]}
    return [f"blocks.{i}.{n}.weight" for k in kinds for n in names[k]]


# ------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("cls", [ViTConfig, ViTSmallConfig])
@pytest.mark.parametrize("shape", [MNIST, CIFAR])
def test_forward_shapes(cls, shape):
    torch.manual_seed(0)
    model = vit(shape, 100, cls)
    tokens = (shape[1] // 4) * (shape[2] // 4) + 1
    assert model.pos_embed.shape == (1, tokens, model.patch_embed.out_channels)
    assert model.patch_embed.in_channels == shape[0]
    assert model(torch.randn(2, *shape)).shape == (2, 100)


def test_sizes_and_layer_names():
    tiny, small = vit(), vit(CIFAR, cls=ViTSmallConfig)
    assert sum(p.numel() for p in tiny.parameters()) == 139_018  # conf/model/vit_tiny.yaml says so
    assert sum(p.numel() for p in small.parameters()) == 1_806_538
    assert isinstance(tiny.blocks[0].attn.q, nn.Linear) and tiny.blocks[3].mlp.fc2.out_features == 64
    assert tiny.blocks[0].mlp.fc1.out_features == 128  # mlp_ratio 2


def test_macs_count_the_attention_products():
    width, tokens, hidden = 16, 50, 32
    model = vit(depth=2, width=width, heads=2)
    per_block = tokens * (4 * width * width + 2 * width * hidden) + 2 * tokens * tokens * width  # + QK^T, AV
    expected = 49 * 16 * width + 2 * per_block + width * 10  # patches, blocks, head
    assert count_macs(model, MNIST).total == expected


def test_prunable_layers_are_exactly_the_declared_ones():
    model = vit(depth=2)
    default = [*block_layers(0), *block_layers(1), "head.weight"]
    assert Masks.ones(model).names() == default
    assert list(prunable_weights(model, biases=True)) == [n for w in default for n in (w, w[:-6] + "bias")]
    only = vit(depth=2, prune=["patch", "mlp"])
    assert Masks.ones(only).names() == ["patch_embed.weight", *block_layers(0, ["mlp"]), *block_layers(1, ["mlp"])]
    every = Masks.ones(vit(depth=1, prune=["patch", "attention", "mlp", "head"]), biases=True, norm=True)
    assert not any(k in n for n in every for k in ("norm", "pos_embed", "cls_token"))


@pytest.mark.parametrize("fields, message", [
    ({"patch_size": 0}, "model.patch_size must be >= 1"),
    ({"width": 64, "heads": 3}, "model.width=64 must be divisible by model.heads=3"),
    ({"prune": ["attention", "norm"]}, "model.prune must list some of: patch, attention, mlp, head"),
    ({"prune": []}, "model.prune must list some of"),
    ({"prune_norm": True}, "model.prune_norm"),
    ({"dropout": 1.0}, "model.dropout must be in [0, 1)"),
])
def test_bad_options_are_config_errors(fields, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        ViTConfig(name="vit_tiny", **fields)


def test_a_patch_size_that_does_not_divide_the_image_is_refused_before_training():
    with pytest.raises(ConfigError, match="model.patch_size=5 must divide the dataset's 28x28 images"):
        build(make_config(*TINY, "model.patch_size=5"))
    assert vit(CIFAR, patch_size=8).pos_embed.shape[1] == 17
    with pytest.raises(ConfigError, match=r"\[C, H, W\]"):
        vit((784,))


# ---------------------------------------------------------------------------- the pipeline
def test_a_tiny_vit_prunes_half_its_declared_weights(tmp_path):
    summary = run(make_config(*TINY, "criterion=magnitude", "sparsity=0.5"), tmp_path)
    final = summary["final"]
    assert summary["status"] == "completed" and summary["model"] == "vit_tiny"
    assert abs(final["sparsity"] - 0.5) * summary["prunable_total"] <= 1
    rows = list(csv.DictReader(open(tmp_path / "layers.csv")))
    declared = [*block_layers(0), "head.weight"]
    for r in ("0", "1"):
        assert [row["layer"] for row in rows if row["round"] == r] == declared
    assert sum(int(row["params"]) for row in rows if row["round"] == "0") == summary["prunable_total"]
    assert sum(int(row["nonzero"]) for row in rows if row["round"] == "1") == final["prunable_remaining"]
    assert read_summary(tmp_path)["config"]["train"]["optimizer"] == "adamw"


@pytest.mark.parametrize("criterion", [
    ["criterion=grasp"],
    ["criterion=obd", "criterion.estimator=hutchinson", "criterion.probes=2", "criterion.samples=32"],
    ["criterion=wanda", "granularity=nm"], ["criterion=sparsegpt"],
])
def test_second_order_and_layerwise_criteria_prune_a_vit(tmp_path, criterion):
    # GraSP's Hg and Hutchinson's Hz differentiate attention twice: the math kernel does it
    summary = run(make_config(*TINY, "dataset.num_train=128", "dataset.num_test=64", *criterion, "sparsity=0.5",
                              "calibration.samples=32", "train.finetune_epochs=0"), tmp_path)
    assert abs(summary["final"]["sparsity"] - 0.5) < 0.01


def test_filter_pruning_removes_mlp_hidden_units_only(tmp_path):
    cfg = make_config(*TINY, "model.depth=2", "criterion=magnitude", "granularity=filter", "sparsity=0.5")
    exp = build(cfg)
    producers = exp.granularity.structure.producers
    assert list(producers) == ["blocks.0.mlp.fc1.weight", "blocks.1.mlp.fc1.weight"]  # heads, residual: not alone
    assert "position embeddings" in exp.granularity.structure.skipped["patch_embed"]
    final = run(cfg, tmp_path)["final"]  # the compacted network computes what the masked one does
    assert final["units_removed"] == 0.5
    assert final["channels"]["blocks.0.mlp.fc1"] + final["channels"]["blocks.1.mlp.fc1"] == 32
    assert final["channels"]["blocks.0.attn.q"] == 16


# ------------------------------------------------------------------------ AdamW and warmup
def adamw(**fields):
    return TrainConfig(**{"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "lr_schedule": "cosine",
                          "warmup_epochs": 2, "epochs": 4, **fields})


def test_warmup_then_cosine_lr_by_hand():
    opt = make_optimizer(nn.Linear(2, 2), adamw(), 1e-3)
    schedule = make_lr_schedule(opt, adamw(), 4, 5)  # 20 steps, the first 10 warm up
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs[0] == pytest.approx(1e-4)  # lr / 10 warmup steps
    assert lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)  # warmup's end, cosine's start
    assert lrs[15] == pytest.approx(0.5e-3)  # half-way through the cosine
    assert lrs[19] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)  # after the last step
    step = make_lr_schedule(opt2 := make_optimizer(nn.Linear(2, 2), adamw(), 1.0),
                            adamw(lr_schedule="step", lr_milestones=[3], warmup_epochs=1), 4, 5)
    factors = []
    for _ in range(20):
        factors.append(opt2.param_groups[0]["lr"])
        opt2.step()
        step.step()
    assert factors[4] == 1.0 and factors[14] == 1.0 and factors[15] == pytest.approx(0.1)  # epoch 3 on


def test_adamw_decays_neither_biases_norms_nor_embeddings():
    model = vit(depth=1)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = make_optimizer(model, adamw(), 1e-3).param_groups
    decayed = {names[id(p)] for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    plain = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed == {n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1}
    assert {"pos_embed", "cls_token", "norm.weight", "head.bias", "blocks.0.norm1.bias"} <= plain
    assert isinstance(make_optimizer(model, adamw(), 1e-3), torch.optim.AdamW)


def data(n=40, shape=MNIST):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn((n,) + shape, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    return TensorData("toy", x, y, x, y, 10)


class Lrs(Hook):
    def __init__(self):
        self.lrs = []

    def before_step(self, loop):
        self.lrs.append(loop.opt.param_groups[0]["lr"])


def test_weight_decay_does_not_revive_pruned_weights():
    torch.manual_seed(0)
    model = vit(depth=1, width=16)
    masks = Masks.ones(model)
    gen = torch.Generator().manual_seed(0)
    pruned = {n: (torch.rand(m.shape, generator=gen) < 0.5).float() for n, m in masks.items()}
    masks = Masks(pruned)
    before = copy.deepcopy(model.state_dict())
    cfg = adamw(weight_decay=0.5, batch_size=8, epochs=2, warmup_epochs=1)
    results = fit(model, data(), cfg, 2, 1e-2, torch.Generator().manual_seed(0), masks=masks)  # checks each epoch
    assert [r.lr for r in results] == [pytest.approx(1e-2), pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 4 / 5)))]
    state = model.state_dict()
    for n, m in masks.items():
        assert torch.all(state[n][m == 0] == 0)
        assert not torch.equal(state[n], before[n] * m)  # the survivors trained


class StopAt(Hook):
    """Keeps the phase's state after optimizer step `step`, then stops it."""

    def __init__(self, step):
        self.step, self.saved = step, None

    def after_step(self, loop, batch):
        if loop.step == self.step:
            self.saved = copy.deepcopy((loop.state(), loop.model.state_dict()))
            raise KeyboardInterrupt


def test_a_warmup_phase_resumed_mid_epoch_continues_its_lr_schedule_exactly():
    cfg = adamw(batch_size=8, epochs=3, warmup_epochs=1)  # 5 steps per epoch, 15 in all
    torch.manual_seed(0)
    model = vit(depth=1, width=16)
    start = copy.deepcopy(model.state_dict())
    whole = Lrs()
    fit(model, data(), cfg, 3, 1e-3, torch.Generator().manual_seed(0), hooks=[whole])

    stopped, stop = vit(depth=1, width=16), StopAt(7)  # inside the second epoch, past the warmup
    stopped.load_state_dict(start)
    with pytest.raises(KeyboardInterrupt):
        fit(stopped, data(), cfg, 3, 1e-3, torch.Generator().manual_seed(0), hooks=[stop])
    state, weights = stop.saved
    resumed, rest = vit(depth=1, width=16), Lrs()
    resumed.load_state_dict(weights)
    fit(resumed, data(), cfg, 3, 1e-3, torch.Generator().manual_seed(0), hooks=[rest], resume=state)
    assert rest.lrs == whole.lrs[7:]
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), model.state_dict().values()))


# ------------------------------------------------------------------------------- configs
def test_the_vit_recipes_compose():
    train = make_config("model=vit_tiny", fast=False).train
    assert (train.optimizer, train.lr, train.weight_decay, train.batch_size) == ("adamw", 1e-3, 0.05, 128)
    assert (train.lr_schedule, train.warmup_epochs, train.finetune_warmup_epochs) == ("cosine", 1, 0)
    small = make_config("model=vit_small", "dataset=synthetic", "dataset.shape=[3,32,32]", fast=False)
    assert (small.model.width, small.model.depth, small.model.heads) == (192, 6, 3)
    assert small.train.optimizer == "adamw" and small.train.epochs == 10
    assert finetune_recipe(train).warmup_epochs == 0  # a trained network is fine-tuned without warmup


def test_a_criterion_that_prunes_at_init_warms_up_the_training_after_pruning():
    train = make_config("model=vit_tiny", "criterion=snip", fast=False).train
    assert (train.pretrain_epochs, train.warmup_epochs) == (0, 0)
    assert (train.finetune_epochs, finetune_recipe(train).warmup_epochs) == (3, 1)


@pytest.mark.parametrize("fields, message", [
    ({"warmup_epochs": 5}, r"train.warmup_epochs must be in \[0, train.epochs=4\]"),
    ({"warmup_epochs": -1}, r"train.warmup_epochs must be in \[0, train.epochs=4\]"),
    ({"finetune_warmup_epochs": 4, "finetune_epochs": 3},
     r"train.finetune_warmup_epochs must be in \[0, train.finetune_epochs=3\]"),
    ({"optimizer": "lamb"}, "train.optimizer='lamb' is not one of: adam, adamw, sgd"),
])
def test_bad_recipe_options_are_config_errors(fields, message):
    with pytest.raises(ConfigError, match=message):
        adamw(**fields)


def test_filter_pruning_without_mlp_layers_says_nothing_has_units():
    with pytest.raises(ConfigError, match="granularity=filter: no prunable layer .* has groups of its own"):
        build(make_config(*TINY, "model.prune=[attention,head]", "granularity=filter", "sparsity=0.5"))
