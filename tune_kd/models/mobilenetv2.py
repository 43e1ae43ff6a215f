"""CIFAR MobileNetV2 as in RepDistiller / SimKD ``models/mobilenetv2.py``.

Expansion ratio 6; ``MobileNetV2`` is the field's width-0.5 network (``mobile_half``) and
``MobileNetV2_1_0`` the width-1.0 one (SimKD's ``mobile_half_double``). Unlike torchvision,
the first inverted residual (expansion 1) keeps its 1x1 expansion conv, and the head conv
has 1280 channels at any width <= 1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._init import init_weights
from ._registry import register
from ._stages import Staged

__all__ = ["InvertedResidual", "MobileNetV2Cifar"]

# (expansion, output channels at width 1, blocks, first stride); None: the model's ratio.
_STAGES: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)
_HEAD_CHANNELS = 1280


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise (carrying the stride), linear 1x1 project; residual when
    the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2Cifar(Staged):
    """MobileNetV2 for 32-pixel inputs: stride-2 3x3 stem, seven stages of inverted
    residuals (``blocks``), 1x1 head conv, global average pool, linear classifier.
    Its feature list groups the seven into four stages."""

    stage_names = (
        ("conv1",),
        ("blocks.0", "blocks.1"),
        ("blocks.2",),
        ("blocks.3", "blocks.4"),
        ("blocks.5", "blocks.6"),
        ("conv2", "avgpool"),
    )
    _GROUPS = ((0, 1), (2,), (3, 4), (5, 6))  # blocks of each feature-list stage

    def __init__(self, width: float, expansion: int = 6, num_classes: int = 100) -> None:
        super().__init__()
        in_channels = int(32 * width)
        self.conv1 = _conv_bn_relu(3, in_channels, 3, stride=2)
        self.blocks = nn.ModuleList()
        for stage_expansion, channels, count, stride in _STAGES:
            out_channels = int(channels * width)
            layers = []
            for i in range(count):
                layers.append(
                    InvertedResidual(
                        in_channels,
                        out_channels,
                        stride if i == 0 else 1,
                        stage_expansion or expansion,
                    )
                )
                in_channels = out_channels
            self.blocks.append(nn.Sequential(*layers))
        head_channels = int(_HEAD_CHANNELS * width) if width > 1.0 else _HEAD_CHANNELS
        self.conv2 = _conv_bn_relu(in_channels, head_channels, 1, stride=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(head_channels, num_classes))
        init_weights(self, linear_std=0.01)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def stage(self, i: int, x: Tensor) -> Tensor:
        """Features ``[stem, blocks[1], blocks[2], blocks[4], blocks[6], pooled head]``, one at
        a time."""
        if i == 0:
            return self.conv1(x)
        if i == 5:
            return torch.flatten(self.avgpool(self.conv2(x)), 1)
        for block in self._GROUPS[i - 1]:
            x = self.blocks[block](x)
        return x


@register("mobilenetv2", name="MobileNetV2")
def mobilenetv2_half(num_classes: int = 100) -> MobileNetV2Cifar:
    """Width 0.5, the network the literature calls MobileNetV2."""
    return MobileNetV2Cifar(width=0.5, num_classes=num_classes)


@register("mobilenetv2", name="MobileNetV2_1_0")
def mobilenetv2_1_0(num_classes: int = 100) -> MobileNetV2Cifar:
    return MobileNetV2Cifar(width=1.0, num_classes=num_classes)
