"""Reusing more of the teacher than its classifier (Chen et al., "Knowledge Distillation with the
Reused Teacher Classifier", CVPR 2022: SimKD+ and SimKD++ of Figures 5-7 and Table S.10).

The student runs its stages up to stage k (`reuse_stage`); a SimKD projector maps its stage-k
output onto the shape of the teacher's stage-k output (the larger map average-pooled, as
`base.align`); the loss is the mean squared error against the teacher's stage-k feature. The
prediction runs the frozen teacher from there: its stages k+1..last, its pooling and its
classifier. Those teacher modules stay in eval mode and out of the optimizer (they are the frozen
`base.Teacher`'s, not submodules of the distiller), so their batch-norm statistics never move.
With k = the last stage this is SimKD, except that the teacher's pooling step runs as the teacher
runs it (a MobileNetV2 or ShuffleNetV2 teacher's head convolution included, which SimKD skips).

The paper does not say which layers SimKD+ and SimKD++ reuse; search_spaces/paper_reuse.yaml
says what we infer from the pruning ratios it prints (`tune_kd.params`). The student's stages after
k and its own classifier are part of the student model (the exported student is the whole
network, as for every method) but get no gradient: nothing reads them. The logit terms
(`ce_weight`, `kd_weight`) would need them, so this method does not use them: its loss is
`feat_weight` times the stage-k L2 term.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from tune_kd import losses
from tune_kd.distillers.base import (
    Batch,
    Distiller,
    StepOutput,
    Teacher,
    TeacherOutput,
    align,
    key,
    parameter_count,
    stage_shapes,
)
from tune_kd.distillers.registry import register
from tune_kd.distillers.simkd import PROJECTOR_DESIGNS, SimKD

if TYPE_CHECKING:
    from tune_kd.config import Config
    from tune_kd.models._stages import Staged


def reuse_stages(config: Config, student_stages: int, teacher_stages: int) -> tuple[int, int]:
    """(student stage, teacher stage) whose outputs the projector pairs: `reuse_stage` of both,
    or each network's last stage when it is unset."""
    k = config.reuse_stage
    if k is None:
        return student_stages, teacher_stages
    if k > min(student_stages, teacher_stages):
        raise ValueError(
            f"reuse_stage {k} is past the last stage of {config.student} ({student_stages}) "
            f"or {config.teacher} ({teacher_stages})"
        )
    return k, k


@register
class ReuseDistiller(Distiller):
    """The student up to stage k, a SimKD projector, and the frozen teacher after stage k."""

    name = "reuse"
    keys = (
        key(
            "reuse_stage",
            None,
            "stage k: the student runs up to it, the teacher after it (default: last = SimKD)",
            kind=int | None,
            low=1,
        ),
        key("reuse_design", "1x1-3x3-1x1", "reuse projector layers", choices=PROJECTOR_DESIGNS),
        key("reuse_factor", 2, "reuse projector reduction ratio r", choices=(1, 2, 4, 8)),
    )
    uses = ("teacher", "teacher_checkpoint", "teacher_correct_only", "feat_weight")
    defaults: ClassVar[dict[str, float]] = {"feat_weight": 1.0}
    structure_keys = ("reuse_stage", "reuse_design", "reuse_factor")
    per_sample = True
    # Not tried under vmap fusion or CUDA graph capture: the teacher's modules run inside the step.
    fusable = False
    capturable = False

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
        student_shapes = stage_shapes(student)
        self.student_stage, self.teacher_stage = reuse_stages(
            config, len(student_shapes), len(teacher.stages)
        )
        target = teacher.stages[self.teacher_stage - 1]
        self.teacher_size = target.size
        self.projector = SimKD(
            student_shapes[self.student_stage - 1].channels,
            target.channels,
            factor=config.reuse_factor,
            design=config.reuse_design,
        )
        self.teacher_features = frozenset({self.teacher_stage})

    @classmethod
    def deployed_parameters(cls, config: Config, student: Staged, teacher: Staged | None) -> int:
        """The student's stem and stages up to k, the projector, the teacher's stages after k,
        its pooling step and classifier: the paper's `#se + #proj + Δ`, Δ being what the
        teacher's reused part has beyond the student's part it replaces."""
        assert teacher is not None
        s, t = reuse_stages(config, student.num_stages, teacher.num_stages)
        shapes_s, shapes_t = stage_shapes(student), stage_shapes(teacher)
        projector = SimKD(
            shapes_s[s - 1].channels,
            shapes_t[t - 1].channels,
            factor=config.reuse_factor,
            design=config.reuse_design,
        )
        kept = [m for i in range(s + 1) for m in student.stage_modules(i)]
        reused = [m for i in range(t + 1, teacher.num_stages + 2) for m in teacher.stage_modules(i)]
        return parameter_count(*kept, projector, *reused, teacher.get_classifier())

    def forward(self, images: Tensor) -> dict[str, Any]:
        """The projected stage-k feature and the logits of the teacher's layers after it."""
        features = self.student.run_stages(images, 0, self.student_stage)
        projected = self.projector.project(features[-1], self.teacher_size)
        return {"projected": projected, "logits": self.reused_teacher(projected)}

    def reused_teacher(self, projected: Tensor) -> Tensor:
        """The teacher's stages after k, pooling and classifier on the projected feature."""
        model = self.teacher.model
        pooled = model.run_stages(projected, self.teacher_stage + 1, model.num_stages + 1)[-1]
        return self.teacher.classifier(pooled)

    def loss(
        self, out: dict[str, Any], batch: Batch, teachers: Sequence[TeacherOutput]
    ) -> StepOutput:
        [teacher] = teachers
        projected = out["projected"]
        _, target = align(projected, teacher.features[self.teacher_stage])
        kept = self.kept(teacher)
        loss = self.config.feat_weight * losses.masked_mean(losses.l2(projected, target), kept)
        return StepOutput(loss, out["logits"], kept)

    def predict(self, images: Tensor) -> Tensor:
        return self.forward(images)["logits"]
