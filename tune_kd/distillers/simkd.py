"""SimKD (Chen et al., CVPR 2022): a projector aligns the student's feature map with the teacher's,
and the frozen teacher classifier is reused on the projected features.

Also the variants the study compares: the losses (`l2`, the paper's; `cosine`; `kl` on the
reused classifier's logits), projector designs from the paper's ablation (Table 5), projector
placements: `single` (the paper), `multi` (a second projector at 2/3 of depth) and `all` (one
projector after every student stage), and `teacher_correct_only`.

With several teachers (`extra_teachers`, the paper's multi-teacher Table 6), the student's last
map has one projector per teacher, each to its teacher's last map and width; the loss is the sum of
the per-teacher losses and the prediction the mean of the teachers' reused classifiers on their
projections. The paper gives only Table 6 and its caption for this: one projector per teacher,
the equal weights and the mean of the logits are our reading of it. Several teachers take the
`single` placement and the `l2` or `cosine` loss only; `teacher_correct_only` keeps the samples
every teacher gets right; the logit terms (`ce_weight`, `kd_weight`, off by default) read the
first teacher.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from tune_kd import losses
from tune_kd.distillers.base import (
    EXTRA_TEACHER_KEYS,
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

if TYPE_CHECKING:
    from tune_kd.config import Config

LOSSES = ("l2", "cosine", "kl")
PLACEMENTS = ("single", "multi", "all")
PROJECTOR_DESIGNS = ("1x1", "1x1-1x1", "1x1-dw3x3-1x1", "1x1-3x3-1x1")


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


@register
class SimKDDistiller(Distiller):
    """SimKD with the study's variants; predictions go through the reused teacher classifier."""

    name = "simkd"
    keys = (
        key("loss", "l2", "SimKD distillation loss: l2, cosine or kl", choices=LOSSES),
        key(
            "intermediate_loss",
            None,
            "loss of the projectors before the last (default: loss, l2 where loss is kl)",
            kind=str | None,
            choices=("l2", "cosine"),
        ),
        key(
            "projector",
            "single",
            "projector placement: single, multi or all",
            choices=PLACEMENTS,
        ),
        key("projector_design", "1x1-3x3-1x1", "projector layers", choices=PROJECTOR_DESIGNS),
        key("factor", 2, "projector reduction ratio r", choices=(1, 2, 4, 8)),
        key(
            "projector_weights",
            None,
            "loss weight per projector, first to last (default: 1; 1/3, 2/3; or equal)",
            kind=list[float] | None,
            low=0,
        ),
    )
    uses = (
        "teacher",
        "teacher_checkpoint",
        *EXTRA_TEACHER_KEYS,
        "teacher_correct_only",
        "temperature",
        "ce_weight",
        "kd_weight",
        "feat_weight",
    )
    defaults: ClassVar[dict[str, float]] = {"ce_weight": 0.0, "kd_weight": 0.0, "feat_weight": 1.0}
    structure_keys = ("projector", "projector_design", "factor")
    per_sample = True

    def __init__(
        self,
        student: nn.Module,
        config: Config,
        teachers: Sequence[Teacher] = (),
        train_labels: Tensor | None = None,
    ):
        super().__init__(student, config, teachers, train_labels)
        self.teachers = list(teachers)
        self.teacher = teacher = self.teachers[0]
        student_stages = stage_shapes(student)
        if len(self.teachers) == 1:
            self.pairs = stage_pairs(config.projector, len(student_stages), len(teacher.stages))
            self.owners = [0] * len(self.pairs)  # the teacher each projector maps to
        else:
            if config.projector != "single" or config.loss == "kl":
                raise ValueError(
                    "simkd with several teachers takes projector single and loss l2 or cosine"
                )
            self.pairs = [(len(student_stages), len(t.stages)) for t in self.teachers]
            self.owners = list(range(len(self.teachers)))
        self.projectors = nn.ModuleList(
            SimKD(
                student_stages[s - 1].channels,
                self.teachers[o].stages[t - 1].channels,
                factor=config.factor,
                design=config.projector_design,
            )
            for (s, t), o in zip(self.pairs, self.owners)
        )
        self.weights = config.projector_weights or (
            default_weights(config.projector, len(self.pairs))
            if len(self.teachers) == 1
            else [1.0] * len(self.teachers)
        )
        if len(self.weights) != len(self.pairs):
            raise ValueError(
                f"projector_weights has {len(self.weights)} values for {len(self.pairs)} "
                f"projectors ({config.student} has {len(student_stages)} stages)"
            )
        self.teacher_features = frozenset(t for _, t in self.pairs)
        intermediate = config.intermediate_loss or ("l2" if config.loss == "kl" else config.loss)
        self.intermediate_loss = losses.FEATURE_LOSSES[intermediate]

    @classmethod
    def deployed_parameters(
        cls, config: Config, student: nn.Module, teacher: nn.Module | None
    ) -> int:
        """The paper's `#se + #proj + Δ`: the whole student, the last projector (the others
        only train) and Δ, the teacher's classifier less the student's."""
        assert teacher is not None
        shapes_s, shapes_t = stage_shapes(student), stage_shapes(teacher)
        s, t = stage_pairs(config.projector, len(shapes_s), len(shapes_t))[-1]
        projector = SimKD(
            shapes_s[s - 1].channels,
            shapes_t[t - 1].channels,
            factor=config.factor,
            design=config.projector_design,
        )
        added = parameter_count(projector, teacher.get_classifier())
        return parameter_count(student) + added - parameter_count(student.get_classifier())

    def forward(self, images: Tensor) -> dict[str, Any]:
        """Each projector's output (aligned to its teacher map's size, which is all it needs of the
        teacher), the reused classifier's logits and the student's own."""
        features, own_logits = self.student(images, is_feat=True)
        projected = [
            projector.project(features[s], self.teachers[o].stages[t - 1].size)
            for (s, t), o, projector in zip(self.pairs, self.owners, self.projectors)
        ]
        return {"projected": projected, "logits": self.reused(projected), "own_logits": own_logits}

    def reused(self, projected: Sequence[Tensor]) -> Tensor:
        """The reused classifier on the last projection; with several teachers, the mean of each
        teacher's classifier on its own projection."""
        if len(self.teachers) == 1:
            return classify(projected[-1], self.teacher.classifier)
        logits = [classify(p, t.classifier) for p, t in zip(projected, self.teachers)]
        return sum(logits[1:], logits[0]) / len(logits)

    def loss(
        self, out: dict[str, Any], batch: Batch, teachers: Sequence[TeacherOutput]
    ) -> StepOutput:
        per_sample: Tensor | int = 0
        last = len(self.pairs) - 1
        for i, ((_, t), o, projected, weight) in enumerate(
            zip(self.pairs, self.owners, out["projected"], self.weights)
        ):
            _, target = align(projected, teachers[o].features[t])
            if i < last and len(self.teachers) == 1:
                value = self.intermediate_loss(projected, target)
            elif self.config.loss == "kl":
                value = losses.kl_divergence(
                    out["logits"], teachers[o].logits, self.config.temperature
                )
            else:
                value = losses.FEATURE_LOSSES[self.config.loss](projected, target)
            per_sample = per_sample + weight * value
        kept = self.kept(teachers[0])
        for other in teachers[1:]:
            more = self.kept(other)
            kept = None if kept is None or more is None else kept & more
        loss = self.with_logit_terms(
            losses.masked_mean(per_sample, kept), out["own_logits"], batch, teachers[0]
        )
        return StepOutput(loss, out["logits"], kept)

    def predict(self, images: Tensor) -> Tensor:
        """The last projector and the teacher's classifier on student features (with several
        teachers, the mean over teachers): no teacher pass."""
        if len(self.teachers) == 1:
            return self.teacher.classifier(self.pooled_projection(images))
        return self(images)["logits"]

    def pooled_projection(self, images: Tensor) -> Tensor:
        """The last projector's output, globally pooled: the feature [B, teacher width] that
        enters the reused teacher classifier, the student's counterpart of the teacher's
        pooled feature (with several teachers, the last teacher's)."""
        features, _ = self.student(images, is_feat=True)
        (s, t), o = self.pairs[-1], self.owners[-1]
        projected = self.projectors[-1].project(features[s], self.teachers[o].stages[t - 1].size)
        return projected.mean(dim=(2, 3))
