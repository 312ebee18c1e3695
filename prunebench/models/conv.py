"""Conv-2, Conv-4 and Conv-6 of the lottery-ticket paper (Frankle & Carbin 2019, Figure 2).

Pairs of 3x3 convolutions ("same" padding, ReLU), each pair followed by a 2x2 max-pool, with
64, 128 and 256 filters for the first, second and third pair; then fc256 - ReLU - fc256 - ReLU
- fc(classes). Weights (biases excluded) on 3x32x32 inputs with 10 classes: Conv-2 4,300,992,
Conv-4 2,425,024, Conv-6 2,261,184.
"""

from collections import OrderedDict
from typing import Sequence, Tuple

from torch import nn

from ..config import ConfigError, ModelConfig
from . import register

PAIR_WIDTHS = (64, 128, 256)  # filters of the 1st, 2nd and 3rd pair of convolutions
DEPTHS = {"conv2": 1, "conv4": 2, "conv6": 3}  # pairs of convolutions


class ConvNet(nn.Sequential):
    """conv1..conv{2p} (with relu and pool after each pair), flatten, fc1, fc2, fc3."""
    MACS_IN_LAYERS = True  # metrics.count_macs: its own forward multiplies nothing

    def __init__(self, name: str, pairs: int, input_shape: Tuple[int, ...], num_classes: int,
                 widths: Sequence[int] = PAIR_WIDTHS, hidden: int = 256):
        if len(input_shape) != 3:
            raise ConfigError(f"model={name} needs image inputs [C, H, W], the dataset gives {list(input_shape)}")
        channels, height, width = input_shape
        side = 2 ** pairs
        if height < side or width < side:
            raise ConfigError(f"model={name} halves the image {pairs} times and needs inputs of at least "
                              f"{side}x{side} pixels, the dataset has {height}x{width}")
        layers = []
        for p in range(pairs):
            for j in (2 * p + 1, 2 * p + 2):
                layers.append((f"conv{j}", nn.Conv2d(channels, widths[p], kernel_size=3, padding=1)))
                layers.append((f"relu{j}", nn.ReLU()))
                channels = widths[p]
            layers.append((f"pool{p + 1}", nn.MaxPool2d(2)))
            height, width = height // 2, width // 2
        layers += [
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(channels * height * width, hidden)), ("fc_relu1", nn.ReLU()),
            ("fc2", nn.Linear(hidden, hidden)), ("fc_relu2", nn.ReLU()),
            ("fc3", nn.Linear(hidden, num_classes)),
        ]
        super().__init__(OrderedDict(layers))


def _make_builder(name: str, pairs: int):
    def build(cfg: ModelConfig, input_shape, num_classes):
        return ConvNet(name, pairs, input_shape, num_classes)

    build.__name__ = name
    return build


for _name, _pairs in DEPTHS.items():
    register(_name)(_make_builder(_name, _pairs))
