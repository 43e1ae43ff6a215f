"""AVEG, multi-teacher KD with equal weights (the baseline of Du et al., "Agree to Disagree:
Adaptive Ensemble Knowledge Distillation in Gradient Space", NeurIPS 2020, and of SimKD's
multi-teacher Table 6, Chen et al., CVPR 2022): cross-entropy plus the mean over teachers of each
teacher's T^2-scaled KL divergence (as KD's). With one teacher it is KD.

`teacher_correct_only` is not offered: which samples to keep when the teachers disagree is not
defined by either paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from tune_kd import losses
from tune_kd.distillers.base import EXTRA_TEACHER_KEYS, Batch, Distiller, StepOutput, TeacherOutput
from tune_kd.distillers.registry import register


@register
class AVEG(Distiller):
    name = "aveg"
    uses = (
        "teacher",
        "teacher_checkpoint",
        *EXTRA_TEACHER_KEYS,
        "temperature",
        "ce_weight",
        "kd_weight",
    )
    defaults: ClassVar[dict[str, float]] = {"ce_weight": 1.0, "kd_weight": 1.0}

    def loss(
        self, out: dict[str, Any], batch: Batch, teachers: Sequence[TeacherOutput]
    ) -> StepOutput:
        logits = out["logits"]
        kl = [
            losses.kl_divergence(logits, t.logits, self.config.temperature).mean() for t in teachers
        ]
        loss = self.config.kd_weight * sum(kl[1:], kl[0]) / len(kl)
        if self.config.ce_weight:
            loss = loss + self.config.ce_weight * losses.cross_entropy(logits, batch.labels)
        return StepOutput(loss, logits, None)
