"""VGG-11, VGG-16 and VGG-19 for CIFAR: the variant pruned by SNIP, GraSP and EigenDamage.

The convolutions of Simonyan & Zisserman's configurations A (11), D (16) and E (19): 3x3,
padding 1, each followed by batch norm and ReLU, with five 2x2 max-pools; then ONE linear
classifier (no dropout, no 4096-wide layers). The pools round up (ceil_mode), so 28x28 inputs
reach 1x1 as well (28-14-7-4-2-1); the classifier is sized by a forward pass of a dummy input,
so other input sizes work too. Weights on 32x32 inputs: sum of 9*c_in*c_out over the convs,
plus 512*classes.
"""

from collections import OrderedDict
from typing import Sequence, Tuple, Union

import torch
from torch import nn

from ..config import ConfigError, ModelConfig
from . import register

POOL = "M"
# Simonyan & Zisserman 2015, Table 1: filters per conv, POOL for a 2x2 max-pool
CONFIGURATIONS = {
    "vgg11": (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),  # A
    "vgg16": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL,
              512, 512, 512, POOL, 512, 512, 512, POOL),  # D
    "vgg19": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL,
              512, 512, 512, 512, POOL, 512, 512, 512, 512, POOL),  # E
}


class VGG(nn.Sequential):
    """conv1, bn1, relu1, ..., pool1..pool5, flatten, fc."""
    MACS_IN_LAYERS = True  # metrics.count_macs: its own forward multiplies nothing

    def __init__(self, name: str, plan: Sequence[Union[int, str]], input_shape: Tuple[int, ...],
                 num_classes: int):
        if len(input_shape) != 3:
            raise ConfigError(f"model={name} needs image inputs [C, H, W], the dataset gives {list(input_shape)}")
        channels = input_shape[0]
        layers, convs, pools = [], 0, 0
        for item in plan:
            if item == POOL:
                pools += 1
                layers.append((f"pool{pools}", nn.MaxPool2d(2, ceil_mode=True)))
                continue
            convs += 1
            layers += [(f"conv{convs}", nn.Conv2d(channels, item, kernel_size=3, padding=1, bias=False)),
                       (f"bn{convs}", nn.BatchNorm2d(item)),
                       (f"relu{convs}", nn.ReLU())]
            channels = item
        layers.append(("flatten", nn.Flatten()))
        features = nn.Sequential(OrderedDict(layers)).eval()
        with torch.no_grad():
            width = features(torch.zeros((1,) + tuple(input_shape))).shape[1]
        layers.append(("fc", nn.Linear(width, num_classes)))
        super().__init__(OrderedDict(layers))
        self.train()


def _make_builder(name: str):
    def build(cfg: ModelConfig, input_shape, num_classes):
        return VGG(name, CONFIGURATIONS[name], input_shape, num_classes)

    build.__name__ = name
    return build


for _name in CONFIGURATIONS:
    register(_name)(_make_builder(_name))
