"""Similarity-preserving KD (Tung & Mori, ICCV 2019), as the SimKD code trains it: on the last
stage's feature map (`feat[-2]`) of each network, the B x B Gram matrix of the flattened samples,
each row L2-normalised; the loss is the squared Frobenius distance of the two matrices over B^2.
The maps need not match in channels or size: each network's is compared only with itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
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
)
from tune_kd.distillers.registry import register

if TYPE_CHECKING:
    from tune_kd.config import Config


def similarity(feature: Tensor) -> Tensor:
    """(B, B): the samples' pairwise inner products, each row L2-normalised."""
    flat = feature.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


def sp_loss(feat_s: Tensor, feat_t: Tensor) -> Tensor:
    """||G_t - G_s||_F^2 / B^2."""
    batch = feat_s.shape[0]
    return (similarity(feat_t) - similarity(feat_s)).pow(2).sum() / batch**2


@register
class SP(Distiller):
    name = "sp"
    uses = WITH_LOGIT_TERMS
    defaults: ClassVar[dict[str, float]] = {
        "ce_weight": 1.0,
        "kd_weight": 1.0,
        "feat_weight": 3000.0,
    }

    def __init__(
        self,
        student: nn.Module,
        config: Config,
        teachers: Sequence[Teacher] = (),
        train_labels: Tensor | None = None,
    ):
        super().__init__(student, config, teachers, train_labels)
        [teacher] = teachers
        self.teacher_map = len(teacher.feature_shapes) - 2
        self.teacher_features = frozenset({self.teacher_map})

    def forward(self, images: Tensor) -> dict[str, Any]:
        features, logits = self.student(images, is_feat=True)
        return {"last_map": features[-2], "logits": logits}

    def loss(
        self, out: dict[str, Any], batch: Batch, teachers: Sequence[TeacherOutput]
    ) -> StepOutput:
        [teacher] = teachers
        feat_s, feat_t = out["last_map"], teacher.features[self.teacher_map]
        # float32 Gram matrices: autocast would run the products in half precision
        with torch.autocast(feat_s.device.type, enabled=False):
            term = sp_loss(losses.widened(feat_s), losses.widened(feat_t))
        logits = out["logits"]
        return StepOutput(self.with_logit_terms(term, logits, batch, teacher), logits, None)
