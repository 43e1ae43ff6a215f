"""FitNet (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015), as the SimKD code trains
it: a regressor (convolution, batch norm, ReLU) maps the student's feature map `feat[hint_layer]`
onto the teacher's, and the hint loss is their mean squared error over every element.

The regressor's convolution follows the two maps' heights, as the official `ConvReg`: a student map
twice the teacher's is halved by a 3x3 convolution of stride 2; half the teacher's is doubled by a
4x4 transposed convolution of stride 2; otherwise a larger or equal map is shrunk by a convolution
of kernel (1 + sH - tH, 1 + sW - tW); any other smaller map keeps its size under a 3x3 convolution
and the teacher's map is average-pooled to it. The official code's one-stage training
(cross-entropy + KL + 100 x hint) is the protocol here; its optional hint-only pre-training stage is
not part of the SimKD tables and is not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from tune_kd import losses
from tune_kd.distillers.base import (
    WITH_LOGIT_TERMS,
    Batch,
    Distiller,
    StepOutput,
    Teacher,
    TeacherOutput,
    feature_shapes,
    key,
)
from tune_kd.distillers.registry import register

if TYPE_CHECKING:
    from tune_kd.config import Config


class ConvReg(nn.Module):
    """The hint regressor from a student map of shape `student` (C, H, W) to a teacher map of
    shape `teacher`. Its attributes `conv` and `bn` are named as the official module's, so its
    weights load."""

    def __init__(self, student: Sequence[int], teacher: Sequence[int]):
        super().__init__()
        s_channels, s_height, s_width = student
        t_channels, t_height, t_width = teacher
        self.teacher_size: int | None = None  # the size the teacher map is pooled to, if any
        if s_height == 2 * t_height:
            self.conv = nn.Conv2d(s_channels, t_channels, 3, stride=2, padding=1)
        elif 2 * s_height == t_height:
            self.conv = nn.ConvTranspose2d(s_channels, t_channels, 4, stride=2, padding=1)
        elif s_height >= t_height:
            kernel = (1 + s_height - t_height, 1 + s_width - t_width)
            self.conv = nn.Conv2d(s_channels, t_channels, kernel)
        else:
            self.conv = nn.Conv2d(s_channels, t_channels, 3, padding=1)
            self.teacher_size = s_height
        self.bn = nn.BatchNorm2d(t_channels)

    def forward(self, feat_s: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(feat_s)))

    def target(self, feat_t: Tensor) -> Tensor:
        """The teacher map the regressed student map is compared with."""
        if self.teacher_size is None:
            return feat_t
        return F.adaptive_avg_pool2d(feat_t, (self.teacher_size, self.teacher_size))


def fitnet_loss(hint: Tensor, target: Tensor) -> Tensor:
    """The hint loss: mean squared error over all elements (the batch's mean)."""
    return F.mse_loss(hint, target)


@register
class FitNet(Distiller):
    name = "fitnet"
    keys = (
        key(
            "hint_layer",
            1,
            "feature map FitNet's hint regresses (index into the feature list)",
            low=0,
        ),
    )
    uses = WITH_LOGIT_TERMS
    defaults: ClassVar[dict[str, float]] = {
        "ce_weight": 1.0,
        "kd_weight": 1.0,
        "feat_weight": 100.0,
    }
    structure_keys = ("hint_layer",)

    def __init__(
        self,
        student: nn.Module,
        config: Config,
        teachers: Sequence[Teacher] = (),
        train_labels: Tensor | None = None,
    ):
        super().__init__(student, config, teachers, train_labels)
        [teacher] = teachers
        layer = config.hint_layer
        student_shapes, teacher_shapes = feature_shapes(student), teacher.feature_shapes
        # the last entry is the pooled feature vector, not a map
        maps = min(len(student_shapes), len(teacher_shapes)) - 1
        if layer >= maps:
            raise ValueError(
                f"hint_layer {layer} is not a feature map of both {config.student} and "
                f"{config.teacher} (0 to {maps - 1})"
            )
        self.hint_layer = layer
        self.regressor = ConvReg(student_shapes[layer], teacher_shapes[layer])
        self.teacher_features = frozenset({layer})

    def forward(self, images: Tensor) -> dict[str, Any]:
        features, logits = self.student(images, is_feat=True)
        return {"hint": self.regressor(features[self.hint_layer]), "logits": logits}

    def loss(
        self, out: dict[str, Any], batch: Batch, teachers: Sequence[TeacherOutput]
    ) -> StepOutput:
        [teacher] = teachers
        target = self.regressor.target(teacher.features[self.hint_layer])
        term = fitnet_loss(losses.widened(out["hint"]), losses.widened(target))
        logits = out["logits"]
        return StepOutput(self.with_logit_terms(term, logits, batch, teacher), logits, None)
