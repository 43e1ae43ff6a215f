"""Training methods behind one small interface: a distiller computes its training loss, predicts at
evaluation, and owns the modules it trains. The training loop does not care which one it runs.

- `student`: cross-entropy only (also how teachers are trained);
- `kd`: cross-entropy + T^2-scaled KL on logits (Hinton et al.);
- `simkd`: projectors onto the teacher's feature maps and the reused teacher classifier, with the
  study's losses (l2, cosine, kl), placements (single, multi, all) and `teacher_correct_only`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tune_kd import losses
from tune_kd.config import Config
from tune_kd.simkd import SimKD, align, classify, default_weights, stage_pairs


@dataclass(frozen=True)
class StageShape:
    channels: int
    size: int


def stage_shapes(model: nn.Module, image_size: int = 32) -> list[StageShape]:
    """Channels and spatial size of each stage output (`features[1:-1]`), from one small forward."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        features, _ = model(torch.zeros(1, 3, image_size, image_size, device=device), is_feat=True)
    model.train(was_training)
    return [StageShape(f.shape[1], f.shape[-1]) for f in features[1:-1]]


@dataclass
class TeacherOutput:
    """What one teacher pass gives every student of a batch."""

    logits: Tensor
    features: dict[int, Tensor]  # stage number -> feature map, for the stages students read
    correct: Tensor  # bool per sample: the teacher's top-1 prediction is right


class Teacher:
    """A frozen teacher: eval mode, no gradients, run under `torch.inference_mode`.

    A plain object rather than a module, so that it never enters a student's state dict,
    parameters or optimizer.
    """

    def __init__(self, model: nn.Module):
        self.model = model.eval().requires_grad_(False)
        self.classifier = model.get_classifier()
        self.stages = stage_shapes(model)

    def __call__(self, images: Tensor, labels: Tensor, stages: set[int]) -> TeacherOutput:
        with torch.inference_mode():
            features, logits = self.model(images, is_feat=True)
            correct = logits.argmax(dim=1) == labels
        # Inference tensors cannot be saved for backward; the few that losses use are copied out.
        return TeacherOutput(
            logits=logits.clone(),
            features={stage: features[stage].clone() for stage in stages},
            correct=correct.clone(),
        )


@dataclass
class StepOutput:
    loss: Tensor
    logits: Tensor  # the predictions training accuracy is measured on
    kept: Tensor | None  # samples kept in the distillation term, where some may be left out


class Distiller(nn.Module):
    """Base of the methods. `student` is the network being trained."""

    uses_teacher = True
    teacher_stages: frozenset[int] = frozenset()

    def __init__(self, student: nn.Module, config: Config):
        super().__init__()
        self.student = student
        self.config = config

    def forward(self, images: Tensor) -> dict[str, Any]:
        """The trainable half of a step: what `loss` reads, from this distiller's own modules only.
        Students of one structure can therefore run it as one fused model (`tune_kd.fused`)."""
        return {"logits": self.student(images)}

    def loss(
        self, out: dict[str, Any], labels: Tensor, teacher: TeacherOutput | None
    ) -> StepOutput:
        """The step's loss from `forward`'s outputs and the teacher's pass."""
        raise NotImplementedError

    def train_step(
        self, images: Tensor, labels: Tensor, teacher: TeacherOutput | None
    ) -> StepOutput:
        return self.loss(self(images), labels, teacher)

    def predict(self, images: Tensor) -> Tensor:
        return self.student(images)

    def _kept(self, teacher: TeacherOutput) -> Tensor | None:
        return teacher.correct if self.config.teacher_correct_only else None


class StudentOnly(Distiller):
    uses_teacher = False

    def loss(
        self, out: dict[str, Any], labels: Tensor, teacher: TeacherOutput | None
    ) -> StepOutput:
        logits = out["logits"]
        return StepOutput(
            self.config.ce_weight * losses.cross_entropy(logits, labels), logits, None
        )


class KD(Distiller):
    def loss(
        self, out: dict[str, Any], labels: Tensor, teacher: TeacherOutput | None
    ) -> StepOutput:
        assert teacher is not None
        logits = out["logits"]
        kept = self._kept(teacher)
        kl = losses.kl_divergence(logits, teacher.logits, self.config.temperature)
        loss = self.config.kd_weight * losses.masked_mean(kl, kept)
        if self.config.ce_weight:
            loss = loss + self.config.ce_weight * losses.cross_entropy(logits, labels)
        return StepOutput(loss, logits, kept)


class SimKDDistiller(Distiller):
    """SimKD with the study's variants; predictions go through the reused teacher classifier."""

    def __init__(self, student: nn.Module, config: Config, teacher: Teacher):
        super().__init__(student, config)
        self.teacher = teacher
        student_stages = stage_shapes(student)
        self.pairs = stage_pairs(config.projector, len(student_stages), len(teacher.stages))
        self.projectors = nn.ModuleList(
            SimKD(
                student_stages[s - 1].channels,
                teacher.stages[t - 1].channels,
                factor=config.factor,
                design=config.projector_design,
            )
            for s, t in self.pairs
        )
        self.weights = config.projector_weights or default_weights(
            config.projector, len(self.pairs)
        )
        if len(self.weights) != len(self.pairs):
            raise ValueError(
                f"projector_weights has {len(self.weights)} values for {len(self.pairs)} "
                f"projectors ({config.student} has {len(student_stages)} stages)"
            )
        self.teacher_stages = frozenset(t for _, t in self.pairs)
        self.teacher_size = teacher.stages[-1].size
        intermediate = config.intermediate_loss or ("l2" if config.loss == "kl" else config.loss)
        self.intermediate_loss = losses.FEATURE_LOSSES[intermediate]

    def forward(self, images: Tensor) -> dict[str, Any]:
        """Each projector's output (aligned to its teacher map's size, which is all it needs of the
        teacher), the reused classifier's logits and the student's own."""
        features, own_logits = self.student(images, is_feat=True)
        projected = [
            projector.project(features[s], self.teacher.stages[t - 1].size)
            for (s, t), projector in zip(self.pairs, self.projectors)
        ]
        logits = classify(projected[-1], self.teacher.classifier)
        return {"projected": projected, "logits": logits, "own_logits": own_logits}

    def loss(
        self, out: dict[str, Any], labels: Tensor, teacher: TeacherOutput | None
    ) -> StepOutput:
        assert teacher is not None
        per_sample: Tensor | int = 0
        last = len(self.pairs) - 1
        for i, ((_, t), projected, weight) in enumerate(
            zip(self.pairs, out["projected"], self.weights)
        ):
            _, target = align(projected, teacher.features[t])
            if i < last:
                value = self.intermediate_loss(projected, target)
            elif self.config.loss == "kl":
                value = losses.kl_divergence(out["logits"], teacher.logits, self.config.temperature)
            else:
                value = losses.FEATURE_LOSSES[self.config.loss](projected, target)
            per_sample = per_sample + weight * value
        kept = self._kept(teacher)
        loss = self.config.kd_weight * losses.masked_mean(per_sample, kept)
        if self.config.ce_weight:
            loss = loss + self.config.ce_weight * losses.cross_entropy(out["own_logits"], labels)
        return StepOutput(loss, out["logits"], kept)

    def predict(self, images: Tensor) -> Tensor:
        """The last projector and the teacher's classifier on student features: no teacher pass."""
        features, _ = self.student(images, is_feat=True)
        projected = self.projectors[-1].project(features[self.pairs[-1][0]], self.teacher_size)
        return classify(projected, self.teacher.classifier)


def create(config: Config, student: nn.Module, teacher: Teacher | None) -> Distiller:
    """The distiller `config.method` names, around `student`."""
    if config.method == "student":
        return StudentOnly(student, config)
    if teacher is None:
        raise ValueError(f"method '{config.method}' needs a teacher")
    if config.method == "kd":
        return KD(student, config)
    return SimKDDistiller(student, config, teacher)
