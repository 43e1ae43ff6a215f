"""KD (Hinton et al., 2015): cross-entropy plus the T^2-scaled KL divergence between the softened
class distributions of student and teacher."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from tune_kd import losses
from tune_kd.distillers.base import Batch, Distiller, StepOutput, TeacherOutput
from tune_kd.distillers.registry import register


@register
class KD(Distiller):
    name = "kd"
    uses = (
        "teacher",
        "teacher_checkpoint",
        "teacher_correct_only",
        "temperature",
        "ce_weight",
        "kd_weight",
    )
    defaults: ClassVar[dict[str, float]] = {"ce_weight": 1.0, "kd_weight": 1.0}
    per_sample = True

    def loss(
        self, out: dict[str, Any], batch: Batch, teachers: Sequence[TeacherOutput]
    ) -> StepOutput:
        [teacher] = teachers
        logits = out["logits"]
        kept = self.kept(teacher)
        kl = losses.kl_divergence(logits, teacher.logits, self.config.temperature)
        loss = self.config.kd_weight * losses.masked_mean(kl, kept)
        if self.config.ce_weight:
            loss = loss + self.config.ce_weight * losses.cross_entropy(logits, batch.labels)
        return StepOutput(loss, logits, kept)
