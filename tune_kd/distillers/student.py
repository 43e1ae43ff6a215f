"""The student alone: cross-entropy on the labels (also how teachers are trained)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from tune_kd import losses
from tune_kd.distillers.base import Batch, Distiller, StepOutput, TeacherOutput
from tune_kd.distillers.registry import register


@register
class Student(Distiller):
    name = "student"
    uses = ("ce_weight",)
    defaults: ClassVar[dict[str, float]] = {"ce_weight": 1.0}
    uses_teacher = False
    per_sample = True

    def loss(
        self, out: dict[str, Any], batch: Batch, teachers: Sequence[TeacherOutput]
    ) -> StepOutput:
        logits = out["logits"]
        loss = self.config.ce_weight * losses.cross_entropy(logits, batch.labels)
        return StepOutput(loss, logits, None)
