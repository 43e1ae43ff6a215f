"""SimKD (Chen et al., CVPR 2022): a projector aligns the student's feature map with the teacher's,
and the frozen teacher classifier is reused on the projected features.

Also the variants the study compares: projector designs from the paper's ablation (Table 5), and
projector placements: `single` (the paper), `multi` (a second projector at 2/3 of depth) and `all`
(one projector after every student stage).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from tune_kd.config import PROJECTOR_DESIGNS


def _conv_bn_relu(
    in_channels: int, out_channels: int, kernel: int, groups: int = 1
) -> list[nn.Module]:
    conv = nn.Conv2d(
        in_channels, out_channels, kernel, padding=kernel // 2, groups=groups, bias=False
    )
    return [conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def make_projector(
    design: str, in_channels: int, out_channels: int, factor: int = 2
) -> nn.Sequential:
    """Projector layers of the paper's ablation, each convolution followed by BN and ReLU.

    The inner width is `out_channels // factor` (the reduction ratio r).
    """
    mid = max(out_channels // factor, 1)
    if design == "1x1":
        layers = _conv_bn_relu(in_channels, out_channels, 1)
    elif design == "1x1-1x1":
        layers = _conv_bn_relu(in_channels, mid, 1) + _conv_bn_relu(mid, out_channels, 1)
    elif design == "1x1-dw3x3-1x1":
        layers = (
            _conv_bn_relu(in_channels, mid, 1)
            + _conv_bn_relu(mid, mid, 3, groups=mid)
            + _conv_bn_relu(mid, out_channels, 1)
        )
    elif design == "1x1-3x3-1x1":
        layers = (
            _conv_bn_relu(in_channels, mid, 1)
            + _conv_bn_relu(mid, mid, 3)
            + _conv_bn_relu(mid, out_channels, 1)
        )
    else:
        raise ValueError(
            f"unknown projector design '{design}'; one of {', '.join(PROJECTOR_DESIGNS)}"
        )
    return nn.Sequential(*layers)


def align(feat_s: Tensor, feat_t: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of the two maps to the smaller's spatial size."""
    size_s, size_t = feat_s.shape[-1], feat_t.shape[-1]
    if size_s > size_t:
        return F.adaptive_avg_pool2d(feat_s, size_t), feat_t
    if size_t > size_s:
        return feat_s, F.adaptive_avg_pool2d(feat_t, size_s)
    return feat_s, feat_t


class SimKD(nn.Module):
    """One projector from a student feature map to a teacher feature map.

    `forward(feat_s, feat_t, teacher_classifier)` returns `(projected_student, aligned_teacher,
    logits)`, the logits being the teacher's own classifier applied to the pooled projection.
    The attribute name `transfer` matches the official code, so its projector weights load.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        factor: int = 2,
        design: str = "1x1-3x3-1x1",
    ):
        super().__init__()
        self.transfer = make_projector(design, student_channels, teacher_channels, factor)

    def forward(
        self, feat_s: Tensor, feat_t: Tensor, teacher_classifier: nn.Module | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        source, target = align(feat_s, feat_t)
        projected = self.transfer(source)
        logits = None if teacher_classifier is None else classify(projected, teacher_classifier)
        return projected, target, logits

    def project(self, feat_s: Tensor, teacher_size: int) -> Tensor:
        """Project without a teacher map: only its spatial size is needed to align."""
        if feat_s.shape[-1] > teacher_size:
            feat_s = F.adaptive_avg_pool2d(feat_s, teacher_size)
        return self.transfer(feat_s)


def classify(projected: Tensor, teacher_classifier: nn.Module) -> Tensor:
    """The reused teacher classifier on the globally pooled projected features."""
    return teacher_classifier(projected.mean(dim=(2, 3)))


def stage_pairs(placement: str, student_stages: int, teacher_stages: int) -> list[tuple[int, int]]:
    """(student stage, teacher stage) of each projector, first to last; stages count from 1.

    `multi` adds the stage at 2/3 of depth, `round(2 * stages / 3)`: stage 2 of the three-stage
    ResNets, WRNs and ShuffleNets, stage 3 of the four-stage VGGs, MobileNetV2s and ResNet50.
    `all` pairs student stage i with teacher stage `ceil(i * teacher_stages / student_stages)`, the
    teacher stage at the same relative depth.
    """
    last = (student_stages, teacher_stages)
    if placement == "single":
        return [last]
    if placement == "multi":
        return [(round(2 * student_stages / 3), round(2 * teacher_stages / 3)), last]
    if placement == "all":
        return [
            (i, math.ceil(i * teacher_stages / student_stages))
            for i in range(1, student_stages + 1)
        ]
    raise ValueError(f"unknown projector placement '{placement}'")


def default_weights(placement: str, count: int) -> list[float]:
    """Loss weights of the projectors, first to last: the study's 1/3 + 2/3, or equal."""
    if placement == "multi":
        return [1 / 3, 2 / 3]
    return [1 / count] * count
