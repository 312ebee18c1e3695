"""Model zoo: sizes against the papers' counts, forward shapes, configs, torchvision models. No training."""

import math
import urllib.error

import pytest
import torch
from conftest import make_config
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from torch import nn

from prunebench.config import ConfigError
from prunebench.core.masks import prunable_weights
from prunebench.models import MODELS, build_model
from prunebench.config.options import TorchvisionConfig

CIFAR, MNIST = (3, 32, 32), (1, 28, 28)
NEW_OPTIONS = ["conv2", "conv4", "conv6", "vgg11", "vgg16", "vgg19", "resnet20", "resnet32", "resnet56",
               "torchvision"]


def model_config(name, **fields):
    """The model's schema (from Hydra's ConfigStore, as its YAML starts from) as a validated dataclass."""
    node = ConfigStore.instance().load(f"model_{name}_schema.yaml").node
    return OmegaConf.to_object(OmegaConf.merge(node, {"name": name, **fields}))


def build(name, shape=CIFAR, classes=10, **fields):
    return build_model(model_config(name, **fields), shape, classes)


def n_weights(model):
    return sum(p.numel() for p in prunable_weights(model).values())


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("name, shape, weights", [
    ("lenet300", MNIST, 266_200),  # Han et al. 2015
    ("lenet5", MNIST, 430_500),  # Han et al. 2015 (Caffe LeNet-5)
    ("conv2", CIFAR, 4_300_992),  # Frankle & Carbin 2019, Figure 2
    ("conv4", CIFAR, 2_425_024),
    ("conv6", CIFAR, 2_261_184),
])
def test_weight_counts_match_papers(name, shape, weights):
    assert n_weights(build(name, shape)) == weights


# Simonyan & Zisserman 2015, Table 1: the conv widths of configurations A, D, E
VGG_CONVS = {
    "vgg11": [64, 128, 256, 256, 512, 512, 512, 512],
    "vgg16": [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512],
    "vgg19": [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512],
}


@pytest.mark.parametrize("name", sorted(VGG_CONVS))
@pytest.mark.parametrize("shape, classes", [(CIFAR, 10), (MNIST, 100)])
def test_vgg_weights_match_hand_count(name, shape, classes):
    widths = VGG_CONVS[name]
    ins = [shape[0]] + widths[:-1]
    expected = sum(9 * a * b for a, b in zip(ins, widths)) + 512 * classes
    model = build(name, shape, classes)
    assert n_weights(model) == expected
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == widths
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == len(widths)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].in_features == 512  # one classifier


def test_vgg_known_totals():
    # CIFAR-10 weights of the BN-VGG with one classifier: 14.7M (VGG-16) and 20.0M (VGG-19)
    assert n_weights(build("vgg16")) == 14_715_584
    assert n_weights(build("vgg19")) == 20_024_000


# He et al. 2016, Table 6: 0.27M, 0.46M, 0.85M (all parameters, option A, 10 classes)
RESNET_PARAMS = {"resnet20": 269_722, "resnet32": 464_154, "resnet56": 853_018}
# option B adds a 1x1 conv + BN at the two shape changes: 16*32 + 32*64 weights, 2*(32 + 64) BN
PROJECTION_PARAMS = 16 * 32 + 32 * 64 + 2 * (32 + 64)


@pytest.mark.parametrize("name", sorted(RESNET_PARAMS))
def test_resnet_parameter_counts(name):
    model_a = build(name)
    assert n_params(model_a) == RESNET_PARAMS[name]
    assert round(n_params(model_a) / 1e6, 2) == {"resnet20": 0.27, "resnet32": 0.46, "resnet56": 0.85}[name]
    assert not any("shortcut" in n for n, _ in model_a.named_parameters())  # option A: parameter-free
    model_b = build(name, shortcut="B")
    assert n_params(model_b) == RESNET_PARAMS[name] + PROJECTION_PARAMS
    assert n_params(build("resnet20", shortcut="B")) == 272_474


def test_resnet_layer_names():
    names = list(prunable_weights(build("resnet56")))
    n = 9
    assert len(names) == 6 * n + 2  # 6n+2 weighted layers
    assert names[0] == "conv1.weight" and names[-1] == "fc.weight"
    assert names[1:3] == ["layer1.0.conv1.weight", "layer1.0.conv2.weight"]
    assert "layer3.8.conv2.weight" in names
    names_b = list(prunable_weights(build("resnet20", shortcut="B")))
    assert "layer2.0.shortcut.conv.weight" in names_b and "layer3.0.shortcut.conv.weight" in names_b


def test_resnet_shortcut_a_pads_zero_channels():
    block = build("resnet20").layer2[0]
    x = torch.randn(2, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, 16:]) == 0


def test_resnet_shortcut_is_validated():
    with pytest.raises(ConfigError, match="model.shortcut"):
        model_config("resnet20", shortcut="C")


# --------------------------------------------------------------------------- every model
@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shape_and_first_layer(name):
    torch.manual_seed(0)
    for shape in (MNIST, CIFAR):
        for classes in (10, 100):
            model = build(name, shape, classes)
            assert model.training
            assert model(torch.randn((2,) + shape)).shape == (2, classes)
            # the layer that reads the input (a ViT's patch embedding, unpruned by default, included)
            layer = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
            if isinstance(layer, nn.Conv2d):
                assert layer.in_channels == shape[0]
            else:
                assert isinstance(layer, nn.Linear) and layer.in_features == math.prod(shape)


def test_registry_has_the_new_models():
    assert set(NEW_OPTIONS) - {"torchvision"} <= set(MODELS)


@pytest.mark.parametrize("name", ["conv2", "conv4", "conv6"])
def test_conv_nets_reject_too_small_inputs(name):
    with pytest.raises(ConfigError, match="at least"):
        build(name, (3, 1, 1))


@pytest.mark.parametrize("name", ["conv6", "vgg11", "resnet20"])
def test_conv_models_need_images(name):
    with pytest.raises(ConfigError, match=r"\[C, H, W\]"):
        build(name, (784,))


@pytest.mark.parametrize("init", ["default", "kaiming_normal", "kaiming_uniform", "xavier_normal", "orthogonal"])
def test_init_schemes_on_a_conv_model(init):
    torch.manual_seed(0)
    model = build("conv4", init=init)
    out = model(torch.randn(2, *CIFAR))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    if init != "default":
        assert all(torch.count_nonzero(m.bias) == 0 for m in model.modules() if isinstance(m, nn.Conv2d))
    if init == "orthogonal":
        w = model.fc2.weight.detach()
        assert torch.allclose(w @ w.T, torch.eye(256), atol=1e-4)


# ---------------------------------------------------------------------------- torchvision
def tv_build(shape=CIFAR, classes=10, **fields):
    return build_model(TorchvisionConfig(**{"name": "resnet18", **fields}), shape, classes)


def test_torchvision_resnet18_on_cifar():
    model = tv_build()
    assert type(model).__name__ == "ResNet"
    assert model(torch.randn(2, *CIFAR)).shape == (2, 10)
    assert model.fc.out_features == 10
    assert next(iter(prunable_weights(model))) == "conv1.weight"


def test_torchvision_unknown_name():
    with pytest.raises(ConfigError, match=r"list_models\(module=torchvision.models\).*resnet18") as e:
        tv_build(name="resnet19")
    assert "\n" not in str(e.value)


def test_torchvision_one_channel_input():
    with pytest.raises(ConfigError, match="resnet18 takes 3-channel images.*1 channel") as e:
        tv_build(shape=MNIST)
    assert "\n" not in str(e.value)


def test_torchvision_pretrained_download_failure(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(ConfigError, match="IMAGENET1K_V1.*URLError.*Name or service") as e:
        tv_build(weights="IMAGENET1K_V1")
    assert "\n" not in str(e.value)


def test_torchvision_pretrained_head_is_replaced(monkeypatch):
    import torchvision

    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18(num_classes=1000).state_dict()
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", lambda *a, **k: imagenet)
    model = tv_build(weights="IMAGENET1K_V1")
    assert model.fc.out_features == 10 and model.fc.in_features == 512
    assert torch.equal(model.conv1.weight, imagenet["conv1.weight"])  # the body is the pretrained one
    assert model(torch.randn(2, *CIFAR)).shape == (2, 10)
    same = tv_build(classes=1000, weights="IMAGENET1K_V1")  # 1000 classes: the pretrained head is kept
    assert torch.equal(same.fc.weight, imagenet["fc.weight"])


def test_torchvision_weights_are_validated():
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):  # lists the valid names
        tv_build(weights="IMAGENET_V9")
    with pytest.raises(ConfigError, match="model.init"):
        TorchvisionConfig(name="resnet18", weights="IMAGENET1K_V1", init="kaiming_normal")


# -------------------------------------------------------------------------------- configs
RECIPES = {  # model option -> (optimizer, lr, batch, pretrain epochs, finetune epochs, finetune lr)
    "conv2": ("adam", 2e-4, 60, 24, 24, None),
    "conv4": ("adam", 3e-4, 60, 30, 30, None),
    "conv6": ("adam", 3e-4, 60, 36, 36, None),
    "vgg11": ("sgd", 0.1, 128, 160, 40, 0.001),
    "vgg16": ("sgd", 0.1, 128, 160, 40, 0.001),
    "vgg19": ("sgd", 0.1, 128, 160, 40, 0.001),
    "resnet20": ("sgd", 0.1, 128, 164, 40, 0.001),
    "resnet32": ("sgd", 0.1, 128, 164, 40, 0.001),
    "resnet56": ("sgd", 0.1, 128, 164, 40, 0.001),
    "torchvision": ("sgd", 0.1, 256, 90, 20, 0.001),
}


@pytest.mark.parametrize("option", NEW_OPTIONS)
def test_compose_every_new_option(option):
    # make_config shortens the epochs (train.pretrain_epochs=1 ...), so compare them without it
    cfg = make_config(f"model={option}", "dataset=synthetic", "dataset.shape=[3,32,32]", fast=False)
    optimizer, lr, batch, pretrain, finetune, finetune_lr = RECIPES[option]
    assert cfg.model.name == ("resnet18" if option == "torchvision" else option)
    assert cfg.model.source == ("torchvision" if option == "torchvision" else "prunebench")
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.batch_size) == (optimizer, lr, batch)
    epochs = (cfg.train.pretrain_epochs, cfg.train.finetune_epochs, cfg.train.finetune_lr)
    assert epochs == (pretrain, finetune, finetune_lr)
    if optimizer == "sgd":
        assert cfg.train.momentum == 0.9 and not cfg.train.nesterov and cfg.train.lr_schedule == "step"
        assert all(m < cfg.train.pretrain_epochs for m in cfg.train.lr_milestones)
    assert make_config(f"model={option}").train.pretrain_epochs == 1  # the fast overrides still apply


def test_compose_model_options():
    cfg = make_config("model=resnet32", "model.shortcut=B")
    assert cfg.model.shortcut == "B" and cfg.train.lr_milestones == [82, 123] and cfg.train.weight_decay == 1e-4
    cfg = make_config("model=vgg16")
    assert cfg.train.lr_milestones == [80, 120] and cfg.train.weight_decay == 5e-4
    cfg = make_config("model=torchvision", "model.name=resnet50", "model.weights=IMAGENET1K_V1")
    assert (cfg.model.name, cfg.model.weights, cfg.train.lr_milestones) == ("resnet50", "IMAGENET1K_V1", [30, 60])
    with pytest.raises(Exception, match="shortcut"):
        make_config("model=vgg16", "model.shortcut=B")  # only the ResNets have it


# the ViTs multiply in attention, outside their layers: counted by dispatch (tests/test_vit.py)
@pytest.mark.parametrize("name", sorted(n for n in MODELS if not n.startswith("vit")))
def test_hook_mac_count_equals_the_dispatch_counters_for_every_model(name):
    """The fast MAC count (forward hooks on Conv/Linear) is taken only where it is exact: for
    every registered model it equals torch.utils.flop_counter's, total and per module."""
    from prunebench.core.metrics import compute_in_layers, dispatched_macs, layer_macs
    from prunebench.models import default_config

    shape = (1, 28, 28) if name.startswith("lenet") else (3, 32, 32)
    model = build_model(default_config(name), shape, 10).eval()
    x = torch.zeros((1,) + shape)
    assert compute_in_layers(model)
    with torch.no_grad():
        assert layer_macs(model, x) == dispatched_macs(model, x)


def test_a_module_that_multiplies_in_its_own_forward_is_counted_by_dispatch():
    from prunebench.core.metrics import compute_in_layers, count_macs

    class Gram(nn.Module):
        def forward(self, x):
            return x @ x.transpose(-1, -2)

    model = nn.Sequential(nn.Linear(4, 3), Gram())
    assert not compute_in_layers(model)
    assert count_macs(model, (5, 4)).total == 5 * 4 * 3 + 5 * 3 * 5  # the Linear's and the Gram's
