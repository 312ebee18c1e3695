"""Any torchvision classification model by name: `model=torchvision model.name=resnet18`.

Built with `torchvision.models.get_model`. With `model.weights` (a name of torchvision's weights
enum for that model, e.g. IMAGENET1K_V1 or DEFAULT) the pretrained model is loaded, and its last
classification layer is replaced by a freshly initialised one when the dataset has another
number of classes. torchvision is imported only when such a model is built.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from ..config import ConfigError, ModelConfig

EXAMPLES = ("resnet18", "resnet50", "vgg16_bn", "mobilenet_v2", "efficientnet_b0", "vit_b_16")


def build_torchvision(cfg: ModelConfig, input_shape: Tuple[int, ...], num_classes: int) -> nn.Module:
    import torchvision.models as tvm

    name, weights = cfg.name, getattr(cfg, "weights", None)
    valid = tvm.list_models(module=tvm)
    if name not in valid:
        raise ConfigError(
            f"model.name={name!r} is not a torchvision classification model; "
            f"torchvision.models.list_models(module=torchvision.models) gives the {len(valid)} valid ones, "
            f"e.g. {', '.join(e for e in EXAMPLES if e in valid)}")
    if len(input_shape) != 3:
        raise ConfigError(f"model={name} needs image inputs [C, H, W], the dataset gives {list(input_shape)}")

    if weights is None:
        model = tvm.get_model(name, weights=None, num_classes=num_classes)
    else:
        model = _pretrained(tvm, name, weights, num_classes)

    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if isinstance(first, nn.Conv2d) and first.in_channels != input_shape[0]:
        raise ConfigError(f"torchvision model {name} takes {first.in_channels}-channel images (its first conv), "
                          f"the dataset has {input_shape[0]} channel{'s' if input_shape[0] != 1 else ''} "
                          f"{list(input_shape)}; use a {first.in_channels}-channel dataset or a prunebench model")
    _check_forward(model, name, input_shape)
    return model


def _pretrained(tvm, name: str, weights: str, num_classes: int) -> nn.Module:
    try:
        enum = tvm.get_model_weights(name)
        choices = [w for w in enum.__members__]
    except Exception:  # a model without published weights
        enum, choices = None, []
    try:
        resolved = enum.verify(weights) if enum is not None else None
    except (KeyError, ValueError, TypeError):
        resolved = None
    if resolved is None:
        raise ConfigError(f"model.weights={weights!r} is not a torchvision weights name for {name} "
                          f"(valid: {', '.join(choices) or 'none'})")
    try:
        model = tvm.get_model(name, weights=resolved)
    except Exception as e:  # no network, a broken download, a corrupt cache file
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"could not load torchvision weights {resolved} for model {name}: "
                          f"{type(e).__name__}: {detail}") from None
    pretrained_classes = len(resolved.meta.get("categories") or [])
    if pretrained_classes != num_classes:
        replace_classifier(model, num_classes, name)
    return model


def replace_classifier(model: nn.Module, num_classes: int, name: str = "model") -> None:
    """Swap the last Linear layer (or, as in SqueezeNet, a final 1x1 conv) for a fresh one with
    `num_classes` outputs."""
    last_name, last = None, None
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            last_name, last = module_name, module
    if isinstance(last, nn.Linear):
        new = nn.Linear(last.in_features, num_classes, bias=last.bias is not None)
    elif isinstance(last, nn.Conv2d) and last.kernel_size == (1, 1):
        new = nn.Conv2d(last.in_channels, num_classes, 1, bias=last.bias is not None)
    else:
        raise ConfigError(f"cannot find the classification layer of torchvision model {name} to resize it "
                          f"to {num_classes} classes; use model.weights=null")
    new = new.to(device=last.weight.device, dtype=last.weight.dtype)
    parent_name, _, attr = last_name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)


@torch.no_grad()
def _check_forward(model: nn.Module, name: str, input_shape: Tuple[int, ...]) -> None:
    """One dummy example through the model, so an input size it cannot take fails here, clearly."""
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros((1,) + tuple(input_shape)))
    except Exception as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"torchvision model {name} cannot take inputs of shape {list(input_shape)}: "
                          f"{detail}") from None
    finally:
        model.train(was_training)
