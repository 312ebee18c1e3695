"""LeNet-300-100 and LeNet-5 (the Caffe variant used by Han et al. 2015 and SNIP)."""

import math
from collections import OrderedDict
from typing import Tuple

from torch import nn

from ..config import ConfigError, ModelConfig
from ..config.options import LeNet300Config
from . import register


class LeNet300(nn.Sequential):
    """Fully connected: input -> 300 -> 100 -> classes, ReLU (LeCun et al. 1998)."""
    MACS_IN_LAYERS = True  # metrics.count_macs: its own forward multiplies nothing

    def __init__(self, input_shape: Tuple[int, ...], num_classes: int, hidden=(300, 100)):
        widths = [math.prod(input_shape)] + list(hidden)
        layers = [("flatten", nn.Flatten())]
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]), 1):
            layers += [(f"fc{i}", nn.Linear(a, b)), (f"relu{i}", nn.ReLU())]
        layers.append((f"fc{len(widths)}", nn.Linear(widths[-1], num_classes)))
        super().__init__(OrderedDict(layers))


class LeNet5Caffe(nn.Sequential):
    """conv20(5x5) - maxpool2 - conv50(5x5) - maxpool2 - fc500 - ReLU - fc(classes).

    As in Caffe's lenet prototxt: no padding, and no nonlinearity after the convolutions.
    430,500 weights on 28x28 inputs.
    """
    MACS_IN_LAYERS = True  # metrics.count_macs: its own forward multiplies nothing

    def __init__(self, input_shape: Tuple[int, ...], num_classes: int):
        c, h, w = input_shape
        out_h, out_w = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        if out_h < 1 or out_w < 1:
            raise ConfigError(f"model=lenet5 needs inputs of at least 12x12 pixels, the dataset has {h}x{w}")
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(c, 20, 5)), ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(20, 50, 5)), ("pool2", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()), ("fc1", nn.Linear(50 * out_h * out_w, 500)), ("relu", nn.ReLU()),
            ("fc2", nn.Linear(500, num_classes))]))


@register("lenet300")
def lenet300(cfg: LeNet300Config, input_shape, num_classes):
    return LeNet300(input_shape, num_classes, cfg.hidden)


@register("lenet5")
def lenet5(cfg: ModelConfig, input_shape, num_classes):
    if len(input_shape) != 3:
        raise ConfigError(f"model=lenet5 needs image inputs [C, H, W], the dataset gives {list(input_shape)}")
    return LeNet5Caffe(input_shape, num_classes)
