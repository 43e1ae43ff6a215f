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


class WideResNet(nn.Module):
    """Pre-activation wide ResNet: a 3x3 stem (16 channels), three stages, final BN-ReLU."""

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

    def forward(self, x: Tensor, is_feat: bool = False) -> Tensor | tuple[list[Tensor], Tensor]:
        """Logits, or ``([stem, block1, block2, relu(bn1(block3)), pooled], logits)`` with
        ``is_feat``."""
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = F.relu(self.bn1(self.block3(f2)))
        # One whole-map window: the reference's avg_pool2d(x, 8) at 32 pixels, bit for bit.
        pooled = torch.flatten(F.avg_pool2d(f3, f3.shape[2:]), 1)
        logits = self.fc(pooled)
        return ([f0, f1, f2, f3, pooled], logits) if is_feat else logits


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
