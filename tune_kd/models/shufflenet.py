"""CIFAR ShuffleNets as in RepDistiller / SimKD ``models/ShuffleNetv1.py`` and
``models/ShuffleNetv2.py``.

Both use a 1x1 stride-1 stem with 24 channels and no max pool, so three stride-2 stages take
a 32-pixel input to 4x4. They keep PyTorch's default initialisation, as those codebases do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import register
from ._stages import Staged

__all__ = [
    "DownUnitV2",
    "ShuffleNetV1",
    "ShuffleNetV2",
    "ShuffleUnitV1",
    "ShuffleUnitV2",
    "channel_shuffle",
]

_STEM_CHANNELS = 24


def _global_avg_pool(x: Tensor) -> Tensor:
    """Average over the whole map with one pooling window: the reference's
    ``avg_pool2d(x, 4)`` at 32 pixels, bit for bit, and still global at other sizes."""
    return torch.flatten(F.avg_pool2d(x, x.shape[2:]), 1)


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of ``groups`` equal groups: [N, g*c, H, W] -> channel order
    (0, c, 2c, ..., 1, c+1, ...)."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


class ShuffleUnitV1(nn.Module):
    """Grouped 1x1, channel shuffle, 3x3 depthwise, grouped 1x1. At stride 2 the output is
    the concatenation with a 3x3 average pool of the input, else the sum with the input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int) -> None:
        super().__init__()
        mid = out_channels // 4
        # The first unit sees the 24-channel stem, which does not split into groups;
        # the shuffle after conv1 uses the same grouping.
        self.conv1_groups = 1 if in_channels == _STEM_CHANNELS else groups
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, mid, 1, groups=self.conv1_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.conv1_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            shortcut = F.avg_pool2d(x, 3, stride=2, padding=1)
            return F.relu(torch.cat([out, shortcut], 1))
        return F.relu(out + x)


class ShuffleNetV1(Staged):
    """ShuffleNet v1: stem, three stages whose first unit halves the resolution and widens
    by concatenation, global average pool, ``linear`` classifier."""

    stage_names = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ())

    def __init__(
        self,
        out_channels: tuple[int, int, int],
        blocks: tuple[int, int, int],
        groups: int,
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, _STEM_CHANNELS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM_CHANNELS)
        in_channels = _STEM_CHANNELS
        stages = []
        for channels, count in zip(out_channels, blocks, strict=True):
            # The first unit's branch only adds what the pooled input does not bring.
            units = [ShuffleUnitV1(in_channels, channels - in_channels, 2, groups)]
            units += [ShuffleUnitV1(channels, channels, 1, groups) for _ in range(count - 1)]
            stages.append(nn.Sequential(*units))
            in_channels = channels
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(in_channels, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.linear

    def stage(self, i: int, x: Tensor) -> Tensor:
        """Features ``[stem, layer1, layer2, layer3, pooled]``, one at a time."""
        if i == 0:
            return F.relu(self.bn1(self.conv1(x)))
        if i == 4:
            return _global_avg_pool(x)
        return (self.layer1, self.layer2, self.layer3)[i - 1](x)


class ShuffleUnitV2(nn.Module):
    """Stride-1 unit: half the channels pass through, the other half goes through
    1x1-BN-ReLU, 3x3 depthwise-BN, 1x1-BN-ReLU; then concatenation and a 2-group shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.half = half

    def forward(self, x: Tensor) -> Tensor:
        kept, branch = x[:, : self.half], x[:, self.half :]
        out = F.relu(self.bn1(self.conv1(branch)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([kept, out], 1), 2)


class DownUnitV2(nn.Module):
    """Stride-2 unit: two branches over the whole input (depthwise then 1x1; 1x1, depthwise,
    1x1), each giving half the output channels; concatenation and a 2-group shuffle."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, 3, 2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(Staged):
    """ShuffleNet v2: stem, three stages (a stride-2 unit then ``blocks`` stride-1 units),
    1x1 head conv, global average pool, ``linear`` classifier."""

    stage_names = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("conv2", "bn2"))

    def __init__(
        self,
        out_channels: tuple[int, int, int, int],
        blocks: tuple[int, int, int],
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, _STEM_CHANNELS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM_CHANNELS)
        in_channels = _STEM_CHANNELS
        stages = []
        for channels, count in zip(out_channels[:3], blocks, strict=True):
            units = [DownUnitV2(in_channels, channels)]
            units += [ShuffleUnitV2(channels) for _ in range(count)]
            stages.append(nn.Sequential(*units))
            in_channels = channels
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(in_channels, out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def get_classifier(self) -> nn.Module:
        return self.linear

    def stage(self, i: int, x: Tensor) -> Tensor:
        """Features ``[stem, layer1, layer2, layer3, pooled head]``, one at a time; the head
        conv sits between ``layer3`` and the pool."""
        if i == 0:
            return F.relu(self.bn1(self.conv1(x)))
        if i == 4:
            return _global_avg_pool(F.relu(self.bn2(self.conv2(x))))
        return (self.layer1, self.layer2, self.layer3)[i - 1](x)


@register("shufflenet")
def ShuffleV1(num_classes: int = 100) -> ShuffleNetV1:
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), groups=3, num_classes=num_classes)


@register("shufflenet")
def ShuffleV2(num_classes: int = 100) -> ShuffleNetV2:
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes=num_classes)


@register("shufflenet")
def ShuffleV2_1_5(num_classes: int = 100) -> ShuffleNetV2:
    return ShuffleNetV2((176, 352, 704, 1024), (3, 7, 3), num_classes=num_classes)
