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


class VGG(nn.Module):
    """VGG with batch norm for 32-pixel inputs (and 64-pixel ones, which get one more
    max pool, ``pool3``, before the last block)."""

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

    def forward(self, x: Tensor, is_feat: bool = False) -> Tensor | tuple[list[Tensor], Tensor]:
        """Logits, or ``([block0, ..., block4 (each after ReLU), pooled], logits)`` with
        ``is_feat``."""
        input_size = x.shape[2]
        f0 = F.relu(self.block0(x))
        f1 = F.relu(self.block1(self.pool0(f0)))
        f2 = F.relu(self.block2(self.pool1(f1)))
        f3 = F.relu(self.block3(self.pool2(f2)))
        out = self.pool3(f3) if input_size == 64 else f3
        f4 = F.relu(self.block4(out))
        pooled = torch.flatten(self.pool4(f4), 1)
        logits = self.classifier(pooled)
        return ([f0, f1, f2, f3, f4, pooled], logits) if is_feat else logits


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
