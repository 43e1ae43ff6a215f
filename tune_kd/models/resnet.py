"""CIFAR ResNets as used in the distillation literature.

``ResNet``: the 3-stage basic-block network of depth 6n+2 (RepDistiller / SimKD
``models/resnet.py``); ``resnet<depth>x<k>`` widens every stage. ``BottleneckResNet``: the
4-stage bottleneck network with a 3x3 stride-1 stem and no max pool (RepDistiller
``models/resnetv2.py``), registered as ``ResNet50``. Module names match those codebases so
their checkpoints load strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._init import init_weights
from ._registry import register
from ._stages import Staged

__all__ = ["BasicBlock", "Bottleneck", "BottleneckResNet", "ResNet"]

_PLAIN = (16, 16, 32, 64)
_X2 = (16, 32, 64, 128)
_X4 = (32, 64, 128, 256)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (projected as ``downsample`` when the
    shape changes)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = _conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        changes_shape = stride != 1 or in_channels != channels
        self.downsample = (
            _projection(in_channels, channels, stride) if changes_shape else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.downsample(x))


class ResNet(Staged):
    """Basic-block CIFAR ResNet of depth 6n+2: a 3x3 stem and three stages of n blocks
    with ``widths[1:]`` channels (the second and third at stride 2)."""

    stage_names = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("avgpool",))

    def __init__(
        self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._stage(widths[0], widths[1], blocks, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], blocks, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)

    @staticmethod
    def _stage(in_channels: int, channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, channels, stride)]
        layers += [BasicBlock(channels, channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def stage(self, i: int, x: Tensor) -> Tensor:
        """Features ``[stem, layer1, layer2, layer3, pooled]``, one at a time."""
        if i == 0:
            return F.relu(self.bn1(self.conv1(x)))
        if i == 4:
            return torch.flatten(self.avgpool(x), 1)
        return (self.layer1, self.layer2, self.layer3)[i - 1](x)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, with a ``shortcut``."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        changes_shape = stride != 1 or in_channels != out_channels
        self.shortcut = (
            _projection(in_channels, out_channels, stride) if changes_shape else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class BottleneckResNet(Staged):
    """Four bottleneck stages (64, 128, 256, 512 channels, x4 expansion) after a 3x3
    stride-1 stem without max pool, for 32-pixel inputs."""

    stage_names = (
        ("conv1", "bn1"),
        ("layer1",),
        ("layer2",),
        ("layer3",),
        ("layer4",),
        ("avgpool",),
    )

    def __init__(self, blocks: tuple[int, int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = _conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64)
        in_channels = 64
        stages = []
        for channels, count, stride in zip((64, 128, 256, 512), blocks, (1, 2, 2, 2), strict=True):
            layers = []
            for i in range(count):
                layers.append(Bottleneck(in_channels, channels, stride if i == 0 else 1))
                in_channels = channels * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_channels, num_classes)
        init_weights(self)

    def get_classifier(self) -> nn.Module:
        return self.linear

    def stage(self, i: int, x: Tensor) -> Tensor:
        """Features ``[stem, layer1, ..., layer4, pooled]``, one at a time."""
        if i == 0:
            return F.relu(self.bn1(self.conv1(x)))
        if i == 5:
            return torch.flatten(self.avgpool(x), 1)
        return (self.layer1, self.layer2, self.layer3, self.layer4)[i - 1](x)


@register("resnet")
def resnet8(num_classes: int = 100) -> ResNet:
    return ResNet(8, _PLAIN, num_classes)


@register("resnet")
def resnet14(num_classes: int = 100) -> ResNet:
    return ResNet(14, _PLAIN, num_classes)


@register("resnet")
def resnet20(num_classes: int = 100) -> ResNet:
    return ResNet(20, _PLAIN, num_classes)


@register("resnet")
def resnet32(num_classes: int = 100) -> ResNet:
    return ResNet(32, _PLAIN, num_classes)


@register("resnet")
def resnet38(num_classes: int = 100) -> ResNet:
    return ResNet(38, _PLAIN, num_classes)


@register("resnet")
def resnet44(num_classes: int = 100) -> ResNet:
    return ResNet(44, _PLAIN, num_classes)


@register("resnet")
def resnet56(num_classes: int = 100) -> ResNet:
    return ResNet(56, _PLAIN, num_classes)


@register("resnet")
def resnet110(num_classes: int = 100) -> ResNet:
    return ResNet(110, _PLAIN, num_classes)


@register("resnet")
def resnet116(num_classes: int = 100) -> ResNet:
    return ResNet(116, _PLAIN, num_classes)


@register("resnet")
def resnet14x2(num_classes: int = 100) -> ResNet:
    return ResNet(14, _X2, num_classes)


@register("resnet")
def resnet38x2(num_classes: int = 100) -> ResNet:
    return ResNet(38, _X2, num_classes)


@register("resnet")
def resnet110x2(num_classes: int = 100) -> ResNet:
    return ResNet(110, _X2, num_classes)


@register("resnet")
def resnet8x4(num_classes: int = 100) -> ResNet:
    return ResNet(8, _X4, num_classes)


@register("resnet")
def resnet14x4(num_classes: int = 100) -> ResNet:
    return ResNet(14, _X4, num_classes)


@register("resnet")
def resnet32x4(num_classes: int = 100) -> ResNet:
    return ResNet(32, _X4, num_classes)


@register("resnet")
def resnet38x4(num_classes: int = 100) -> ResNet:
    return ResNet(38, _X4, num_classes)


@register("resnet")
def ResNet50(num_classes: int = 100) -> BottleneckResNet:
    return BottleneckResNet((3, 4, 6, 3), num_classes=num_classes)
