"""Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017), as
the SimKD code trains it (p = 2): each stage output's spatial attention map, the channel mean of
the squared activations flattened and L2-normalised per sample, is matched between student and
teacher by squared error averaged over the batch and positions, and the stages' terms are summed.

Stages pair in order (`feat[1:-1]` of both networks); a network with more stages has its extra last
stages left out, as the official `zip`. Of two maps of different heights the larger is
average-pooled to the smaller's (square) size.
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
    align,
    stage_shapes,
)
from tune_kd.distillers.registry import register

if TYPE_CHECKING:
    from tune_kd.config import Config


def attention_map(feature: Tensor) -> Tensor:
    """(B, H*W): the channel mean of the squared map, L2-normalised per sample."""
    return F.normalize(feature.pow(2).mean(dim=1).flatten(1), dim=1)


def at_loss(student_stages: Sequence[Tensor], teacher_stages: Sequence[Tensor]) -> Tensor:
    """The sum over stage pairs (the shorter list's length) of the attention maps' mean squared
    error."""
    total: Tensor | float = 0.0
    for feat_s, feat_t in zip(student_stages, teacher_stages):
        feat_s, feat_t = align(feat_s, feat_t)
        total = total + (attention_map(feat_s) - attention_map(feat_t)).pow(2).mean()
    return total


@register
class AT(Distiller):
    name = "at"
    uses = WITH_LOGIT_TERMS
    defaults: ClassVar[dict[str, float]] = {
        "ce_weight": 1.0,
        "kd_weight": 1.0,
        "feat_weight": 1000.0,
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
        self.pairs = min(len(stage_shapes(student)), len(teacher.stages))
        self.teacher_features = frozenset(range(1, self.pairs + 1))

    def forward(self, images: Tensor) -> dict[str, Any]:
        features, logits = self.student(images, is_feat=True)
        return {"stages": features[1 : self.pairs + 1], "logits": logits}

    def loss(
        self, out: dict[str, Any], batch: Batch, teachers: Sequence[TeacherOutput]
    ) -> StepOutput:
        [teacher] = teachers
        term = at_loss(
            [losses.widened(f) for f in out["stages"]],
            [losses.widened(teacher.features[i + 1]) for i in range(self.pairs)],
        )
        logits = out["logits"]
        return StepOutput(self.with_logit_terms(term, logits, batch, teacher), logits, None)
