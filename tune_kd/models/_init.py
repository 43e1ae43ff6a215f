"""The reference codebases' weight initialisation, shared by the model families."""

from __future__ import annotations

from torch import nn


def init_weights(
    model: nn.Module, linear_std: float | None = None, linear_bias: bool = True
) -> None:
    """He-normal (fan-out) convolutions with zero bias and BatchNorm at identity, as RepDistiller
    and SimKD initialise their CIFAR models. Linear layers keep PyTorch's initialisation unless
    `linear_std` draws their weights from N(0, linear_std) with zero bias; `linear_bias=False`
    only zeroes their bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and not linear_bias:
            nn.init.zeros_(m.bias)
