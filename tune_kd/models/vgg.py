"""CIFAR VGGs with batch norm as in RepDistiller / SimKD ``models/vgg.py``.

Five conv blocks (``block0``..``block4``) separated by 2x2 max pools, then global average
pooling and a single ``classifier`` Linear(512, num_classes). Each block's last ReLU is
left out of the block and applied in ``forward``, which keeps the checkpoints' module
indices (``block1.3.weight`` ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._init import init_weights
from ._registry import register
from ._stages import Staged

__all__ = ["VGG"]

_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": (
        (64, 64),
        (128, 128),
        (256, 256, 256, 256),
        (512, 512, 512, 512),
        (512, 512, 512, 512),
    ),
}


def _block(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    """conv(bias)-BN-ReLU per width, without the final ReLU."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(Staged):
    """VGG with batch norm for 32-pixel inputs (and 64-pixel ones, which get one more
    max pool, ``pool3``, before the last block)."""

    stage_names = (
        ("block0",),
        ("pool0", "block1"),
        ("pool1", "block2"),
        ("pool2", "block3"),
        ("pool3", "block4"),
        ("pool4",),
    )

    def __init__(self, config: tuple[tuple[int, ...], ...], num_classes: int = 100) -> None:
        super().__init__()
        in_channels = (3, *(widths[-1] for widths in config[:-1]))
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            _block(c, widths) for c, widths in zip(in_channels, config, strict=True)
        )
        self.pool0 = nn.MaxPool2d(2, 2)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.pool3 = nn.MaxPool2d(2, 2)
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)
        init_weights(self, linear_std=0.01)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def stage(self, i: int, x: Tensor) -> Tensor:
        """Features ``[block0, ..., block4 (each after ReLU), pooled]``, one at a time. A 64-pixel
        input reaches the last block at 8x8 (4x4 at 32 pixels) and is pooled once more first."""
        if i == 0:
            return F.relu(self.block0(x))
        if i == 4:
            return F.relu(self.block4(self.pool3(x) if x.shape[-1] == 8 else x))
        if i == 5:
            return torch.flatten(self.pool4(x), 1)
        pool, block = (
            (self.pool0, self.block1),
            (self.pool1, self.block2),
            (self.pool2, self.block3),
        )[i - 1]
        return F.relu(block(pool(x)))


@register("vgg")
def vgg8(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["vgg8"], num_classes)


@register("vgg")
def vgg11(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["vgg11"], num_classes)


@register("vgg")
def vgg13(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["vgg13"], num_classes)


@register("vgg")
def vgg16(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["vgg16"], num_classes)


@register("vgg")
def vgg19(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["vgg19"], num_classes)
