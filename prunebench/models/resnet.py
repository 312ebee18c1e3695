"""ResNet-20, ResNet-32 and ResNet-56 for CIFAR (He et al. 2016, Section 4.2).

6n+2 weighted layers (n = 3, 5, 9): a 3x3 conv with 16 filters, then three stages of n basic
blocks (two 3x3 convs each) with 16, 32 and 64 filters, the first block of stages 2 and 3
halving the feature map with stride 2; batch norm after every conv, ReLU, global average
pooling and one Linear layer. Where a block changes the shape, the shortcut is

  A (the paper's CIFAR choice): parameter-free, the input subsampled with stride 2 and the new
    channels filled with zeros;
  B: a 1x1 conv with stride 2 and batch norm (a projection).

All parameters with option A and 10 classes: 269,722 / 464,154 / 853,018 (the paper's 0.27M,
0.46M, 0.85M). The pooling is adaptive, so any input size works.
"""

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError
from ..config.options import ResNetConfig
from . import register

BLOCKS = {"resnet20": 3, "resnet32": 5, "resnet56": 9}  # n, basic blocks per stage
STAGE_WIDTHS = (16, 32, 64)


class ZeroPadShortcut(nn.Module):
    """Option A: keep every `stride`-th pixel and append zero channels up to `out_channels`."""
    MACS_IN_LAYERS = True  # metrics.count_macs: its own forward multiplies nothing

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))  # pads the last dims first: W, H, then C

    def extra_repr(self) -> str:
        return f"extra_channels={self.extra}, stride={self.stride}"


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
    MACS_IN_LAYERS = True  # metrics.count_macs: its own forward multiplies nothing

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)),
                ("bn", nn.BatchNorm2d(out_channels))]))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Modules: conv1, bn1, layer1..layer3 (blocks 0..n-1, each conv1/bn1/conv2/bn2/shortcut), pool, fc."""
    MACS_IN_LAYERS = True  # metrics.count_macs: its own forward multiplies nothing

    def __init__(self, name: str, blocks: int, input_shape, num_classes: int, shortcut: str = "A"):
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"model={name} needs image inputs [C, H, W], the dataset gives {list(input_shape)}")
        self.conv1 = nn.Conv2d(input_shape[0], STAGE_WIDTHS[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        channels = STAGE_WIDTHS[0]
        for s, width in enumerate(STAGE_WIDTHS):
            stage = []
            for b in range(blocks):
                stride = 2 if (s > 0 and b == 0) else 1
                stage.append(BasicBlock(channels, width, stride, shortcut))
                channels = width
            self.add_module(f"layer{s + 1}", nn.Sequential(*stage))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def _make_builder(name: str, blocks: int):
    def build(cfg: ResNetConfig, input_shape, num_classes):
        return CifarResNet(name, blocks, input_shape, num_classes, cfg.shortcut)

    build.__name__ = name
    return build


for _name, _blocks in BLOCKS.items():
    register(_name)(_make_builder(_name, _blocks))
