"""Wide ResNets (pre-activation) as in RepDistiller ``models/wrn.py``.

``wrn_<depth>_<k>`` has depth 6n+4 and stage widths 16k, 32k, 64k. Module names
(``block1.layer.0.convShortcut`` ...) match RepDistiller so its checkpoints load strictly.
One deliberate difference: the last feature map (``features[-2]``) is taken after the final
BN-ReLU, where RepDistiller returns block3's raw output, so that the pooled vector fed to
the classifier is its average, as in the ResNets and VGGs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._init import init_weights
from ._registry import register
from ._stages import Staged

__all__ = ["PreActBlock", "WideResNet"]


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice; when the shape changes, the 1x1 ``convShortcut`` projects the
    pre-activated input rather than the raw one."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.convShortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
            if in_channels != out_channels
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class _Stage(nn.Module):
    """A stage of pre-activation blocks, kept under ``layer`` for checkpoint key names."""

    def __init__(self, blocks: int, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            PreActBlock(in_channels, out_channels, stride),
            *(PreActBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(Staged):
    """Pre-activation wide ResNet: a 3x3 stem (16 channels), three stages, final BN-ReLU (part
    of the third stage)."""

    stage_names = (("conv1",), ("block1",), ("block2",), ("block3", "bn1"), ())

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4, got {depth}")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.block1 = _Stage(blocks, widths[0], widths[1], stride=1)
        self.block2 = _Stage(blocks, widths[1], widths[2], stride=2)
        self.block3 = _Stage(blocks, widths[2], widths[3], stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self, linear_bias=False)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def stage(self, i: int, x: Tensor) -> Tensor:
        """Features ``[stem, block1, block2, relu(bn1(block3)), pooled]``, one at a time."""
        if i == 0:
            return self.conv1(x)
        if i == 3:
            return F.relu(self.bn1(self.block3(x)))
        if i == 4:
            # One whole-map window: the reference's avg_pool2d(x, 8) at 32 pixels, bit for bit.
            return torch.flatten(F.avg_pool2d(x, x.shape[2:]), 1)
        return (self.block1, self.block2)[i - 1](x)


@register("wrn")
def wrn_16_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 1, num_classes)


@register("wrn")
def wrn_16_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(16, 2, num_classes)


@register("wrn")
def wrn_40_1(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 1, num_classes)


@register("wrn")
def wrn_40_2(num_classes: int = 100) -> WideResNet:
    return WideResNet(40, 2, num_classes)
