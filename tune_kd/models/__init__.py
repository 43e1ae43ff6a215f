"""CIFAR model zoo of the distillation literature (RepDistiller / CRD and SimKD names).

``create('resnet32x4')`` builds a model; ``load_checkpoint(path)`` loads the field's
teacher checkpoints (``resnet32x4_vanilla/ckpt_epoch_240.pth``) with strict key matching.
Every model returns logits from ``model(x)``, ``(features, logits)`` from
``model(x, is_feat=True)`` with ``features = [f0, stage outputs..., pooled]``, and exposes
its classifier through ``get_classifier()``.
"""

from . import mobilenetv2, resnet, shufflenet, vgg, wrn  # noqa: F401  (registers the models)
from ._registry import (
    arch_from_path,
    archs_matching,
    create,
    family,
    load_checkpoint,
    names,
    num_classes,
    register,
)

__all__ = [
    "arch_from_path",
    "archs_matching",
    "create",
    "family",
    "load_checkpoint",
    "names",
    "num_classes",
    "register",
]
