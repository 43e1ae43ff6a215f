"""SRRL (Yang et al., ICLR 2021, "Knowledge Distillation via Softmax Regression Representation
Learning"): a connector (1x1 convolution, batch norm, ReLU) maps the student's pooled penultimate
feature to the teacher's width; it is matched to the teacher's feature (MSE) and, through the
frozen teacher classifier, to the teacher's logits (MSE). Cross-entropy and KD on the student's
own logits are added, as in the official CIFAR protocol; evaluation uses the student's own
classifier.

As the official code, the teacher classifier is applied but never trained: it belongs to the
frozen teacher and is in no optimizer.
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
)
from tune_kd.distillers.registry import register

if TYPE_CHECKING:
    from tune_kd.config import Config


class Connector(nn.Module):
    """The student's pooled feature (B, C_s) to the teacher's width (B, C_t): a 1x1 convolution
    without bias, batch norm and ReLU on the feature seen as a (B, C_s, 1, 1) map. The attribute
    `transfer` is named as in the official code, so its weights load."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.transfer = nn.Sequential(
            nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
            nn.BatchNorm2d(teacher_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, feat_s: Tensor) -> Tensor:
        return self.transfer(feat_s[:, :, None, None]).flatten(1)


def srrl_loss(
    transferred: Tensor, teacher_logits_of_it: Tensor, feat_t: Tensor, logits_t: Tensor
) -> Tensor:
    """MSE of the connector's output to the teacher's feature plus MSE of the teacher classifier's
    logits on it to the teacher's logits (each a mean over every element, as `nn.MSELoss`)."""
    feature = F.mse_loss(losses.widened(transferred), losses.widened(feat_t))
    return feature + F.mse_loss(losses.widened(teacher_logits_of_it), losses.widened(logits_t))


@register
class SRRLDistiller(Distiller):
    name = "srrl"
    uses = WITH_LOGIT_TERMS
    defaults: ClassVar[dict[str, float]] = {"ce_weight": 1.0, "kd_weight": 1.0, "feat_weight": 1.0}

    def __init__(
        self,
        student: nn.Module,
        config: Config,
        teachers: Sequence[Teacher] = (),
        train_labels: Tensor | None = None,
    ):
        super().__init__(student, config, teachers, train_labels)
        [teacher] = teachers
        self.teacher = teacher
        self.connector = Connector(feature_shapes(student)[-1][0], teacher.feature_shapes[-1][0])
        self.teacher_features = frozenset({len(teacher.feature_shapes) - 1})

    def forward(self, images: Tensor) -> dict[str, Any]:
        """The student's logits, the connector's output and the teacher classifier's logits on
        it (the classifier is shared, frozen, and not this distiller's)."""
        features, logits = self.student(images, is_feat=True)
        transferred = self.connector(features[-1])
        return {
            "logits": logits,
            "transferred": transferred,
            "teacher_logits": self.teacher.classifier(transferred),
        }

    def loss(
        self, out: dict[str, Any], batch: Batch, teachers: Sequence[TeacherOutput]
    ) -> StepOutput:
        [teacher] = teachers
        [last] = self.teacher_features
        term = srrl_loss(
            out["transferred"], out["teacher_logits"], teacher.features[last], teacher.logits
        )
        return StepOutput(
            self.with_logit_terms(term, out["logits"], batch, teacher), out["logits"], None
        )
