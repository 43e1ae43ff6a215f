"""SemCKD (Chen et al., AAAI 2021, "Cross-Layer Distillation with Semantic Calibration"): every
student stage is distilled from every teacher stage, each pair through its own projector, and
the pairs' mean squared errors are weighted per sample by an attention over the teacher stages.
The attention compares the stages' sample-similarity matrices (f f^T over the batch), embedded by
small MLPs: a query per student stage, a key per teacher stage.

As in the official code the embeddings read a whole batch's B x B similarities, so their input
width is the batch size (`batch_size`) and a shorter last batch is skipped (`full_batches_only`).
Deliberate differences: the official embedding modules also hold a `regressor` layer stack that
their forward never uses; ours have no such layers (nothing trains or reads them).

Not fusable: the teacher-side key embeddings are trained modules applied in `loss`, which a fused
group runs with each student's own modules rather than the stacked copies it updates.
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
    StageShape,
    StepOutput,
    Teacher,
    TeacherOutput,
    key,
    stage_shapes,
)
from tune_kd.distillers.registry import register

if TYPE_CHECKING:
    from tune_kd.config import Config

EMBED_FACTOR = 4  # the embeddings' output width is batch_size // 4, as in the official code


def similarity(feature: Tensor) -> Tensor:
    """The B x B inner products of the flattened feature maps of a batch."""
    flat = losses.widened(feature).flatten(1)
    return flat @ flat.t()


class Embed(nn.Module):
    """A similarity matrix's rows to unit vectors: linear, ReLU, linear, L2 normalisation."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear1 = nn.Linear(dim_in, 2 * dim_out)
        self.linear2 = nn.Linear(2 * dim_out, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear2(F.relu(self.linear1(x)))
        return x / x.norm(dim=1, keepdim=True)


def projector(student_channels: int, teacher_channels: int) -> nn.Sequential:
    """1x1 conv, BN, ReLU, 3x3 conv, BN, ReLU, 1x1 conv to the teacher's channels; inner width
    twice the teacher's channels."""
    mid = 2 * teacher_channels
    return nn.Sequential(
        nn.Conv2d(student_channels, mid, 1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, 3, padding=1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, teacher_channels, 1, bias=False),
    )


class SemCKD(nn.Module):
    """The attention and projectors of every student stage x teacher stage pair.

    `student_side` computes what needs only the student's features (queries and projections,
    pooled to the teacher map's size where the student's is larger); `loss` adds the teacher's
    side. Projector of pair (i, j) is `projectors[i * len(teacher_stages) + j]`.
    """

    def __init__(
        self,
        batch_size: int,
        student_stages: Sequence[StageShape],
        teacher_stages: Sequence[StageShape],
        temperature: float = 1.0,
    ):
        super().__init__()
        self.temperature = temperature
        self.teacher_sizes = [t.size for t in teacher_stages]
        dim = batch_size // EMBED_FACTOR
        self.queries = nn.ModuleList(Embed(batch_size, dim) for _ in student_stages)
        self.keys = nn.ModuleList(Embed(batch_size, dim) for _ in teacher_stages)
        self.projectors = nn.ModuleList(
            projector(s.channels, t.channels) for s in student_stages for t in teacher_stages
        )

    def student_side(self, features: Sequence[Tensor]) -> dict[str, Any]:
        """Queries (B, student stages, dim) and each pair's projection, row per student stage."""
        query = torch.stack([q(similarity(f)) for q, f in zip(self.queries, features)], dim=1)
        count = len(self.teacher_sizes)
        projected = []
        for i, feature in enumerate(features):
            row = []
            for j, size in enumerate(self.teacher_sizes):
                source = feature
                if feature.shape[-1] > size:
                    source = F.adaptive_avg_pool2d(feature, size)
                row.append(self.projectors[i * count + j](source))
            projected.append(row)
        return {"query": query, "projected": projected}

    def attention(self, query: Tensor, teacher_features: Sequence[Tensor]) -> Tensor:
        """(B, student stages, teacher stages): softmax over the teacher stages of q . k / T."""
        key_ = torch.stack([k(similarity(f)) for k, f in zip(self.keys, teacher_features)], dim=2)
        return F.softmax(torch.bmm(losses.widened(query), key_) / self.temperature, dim=-1)

    def loss(
        self, student: dict[str, Any], teacher_features: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """`sum(attention * per-sample MSE) / (B * student stages)` and the attention. Where a
        teacher map is larger than the student's, it is pooled to the student's size."""
        attention = self.attention(student["query"], teacher_features)
        errors = []
        for row in student["projected"]:
            for projected, target in zip(row, teacher_features):
                if target.shape[-1] > projected.shape[-1]:
                    target = F.adaptive_avg_pool2d(target, projected.shape[-1])
                errors.append(
                    (losses.widened(projected) - losses.widened(target))
                    .pow(2)
                    .flatten(1)
                    .mean(dim=1)
                )
        batch, stages, _ = attention.shape
        per_pair = torch.stack(errors, dim=1).view_as(attention)
        return (attention * per_pair).sum() / (batch * stages), attention


@register
class SemCKDDistiller(Distiller):
    name = "semckd"
    keys = (
        key(
            "semckd_temperature",
            1.0,
            "SemCKD's attention temperature (q . k / T)",
            low=0,
            open_low=True,
        ),
    )
    uses = WITH_LOGIT_TERMS
    defaults: ClassVar[dict[str, float]] = {
        "ce_weight": 1.0,
        "kd_weight": 1.0,
        "feat_weight": 400.0,
    }
    full_batches_only = True
    fusable = False

    def __init__(
        self,
        student: nn.Module,
        config: Config,
        teachers: Sequence[Teacher] = (),
        train_labels: Tensor | None = None,
    ):
        super().__init__(student, config, teachers, train_labels)
        [teacher] = teachers
        self.semckd = SemCKD(
            config.batch_size, stage_shapes(student), teacher.stages, config.semckd_temperature
        )
        self.teacher_stages = range(1, len(teacher.stages) + 1)  # feat[1:-1]
        self.teacher_features = frozenset(self.teacher_stages)

    def forward(self, images: Tensor) -> dict[str, Any]:
        features, logits = self.student(images, is_feat=True)
        return {"logits": logits, **self.semckd.student_side(features[1:-1])}

    def loss(
        self, out: dict[str, Any], batch: Batch, teachers: Sequence[TeacherOutput]
    ) -> StepOutput:
        [teacher] = teachers
        term, _ = self.semckd.loss(out, [teacher.features[i] for i in self.teacher_stages])
        return StepOutput(
            self.with_logit_terms(term, out["logits"], batch, teacher), out["logits"], None
        )
