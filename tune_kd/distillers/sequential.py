"""Sequential: a new student classifier trained from scratch on a frozen SimKD encoder (Chen et
al., "Knowledge Distillation with the Reused Teacher Classifier", CVPR 2022, Table 4, "Training a
new student classifier from scratch"), the baseline that shows why SimKD reuses the teacher's
classifier rather than training the student's own.

Stage 1 is a SimKD run as any other (method `simkd`); `sequential_from` names its checkpoint (the
`checkpoint.pt` that `tune_kd.train` writes, or its run folder; a local path or a storage URI).
Without it, a sweep (`python -m tune_kd.run`) first trains the trial's own stage 1, SimKD of the
same teacher, student, seed and training keys (`stage1_config`), and caches it under its storage
for later sweeps (`tune_kd.stage1`). Stage 2, this method, loads that run's student and
projectors, freezes them, keeps them in eval mode (their batch-norm statistics never move, in
training as at evaluation), and trains a newly initialised linear classifier with cross-entropy on
the standard recipe. Only the classifier is in the optimizer.

What the classifier reads (`sequential_input`) is our inference, not the paper's words: the paper
only says the student classifier is new and trained from scratch. `student_pooled` (the default):
the student's own pooled feature, the input of its own classifier, without the projector;
`projected`: the last projector's output, pooled, the feature the reused teacher classifier reads
in SimKD. A linear classifier on `projected` can do at least as well on the training set as the
teacher's, so the table's collapse (e.g. 35.72 % for VGG-8 <- ResNet-32x4) points at
`student_pooled`: it collapses exactly where the projector does most of the work. Which input
reproduces Table 4 is to be measured on CIFAR-100 (search_spaces/paper_table4.yaml runs both).

The teacher is needed to build stage 1's projectors (their shapes follow the teacher's last stage),
so the method uses a teacher (`teacher`, `teacher_checkpoint`), which must be the architecture
stage 1 distilled from; its outputs are never read, so a run of sequential students alone skips
the teacher's pass (the distiller reports `uses_teacher` False to the training step).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from tune_kd import losses
from tune_kd.distillers.base import (
    Batch,
    Distiller,
    StepOutput,
    Teacher,
    TeacherOutput,
    feature_shapes,
    key,
    parameter_count,
    stage_shapes,
)
from tune_kd.distillers.registry import register
from tune_kd.distillers.simkd import SimKD, SimKDDistiller, stage_pairs
from tune_kd.storage import Storage

if TYPE_CHECKING:
    from tune_kd.config import Config

INPUTS = ("student_pooled", "projected")
CHECKPOINT_NAME = "checkpoint.pt"  # what tune_kd.train writes in a run folder


def _error(message: str) -> ValueError:
    """A refused `sequential_from`, worded as `tune_kd.config.ConfigError` words its errors."""
    return ValueError(f"key 'sequential_from': {message}")


def stage1_member(path: str | Path, config: Config) -> tuple[Config, dict[str, Tensor]]:
    """The stage-1 SimKD student of `config` in the run checkpoint at `path` (a file, or a run
    folder holding `checkpoint.pt`; a local path, or a storage URI such as s3://...): its
    configuration and its distiller's state. Refuses (one line) a missing or unreadable file, and
    a checkpoint without a SimKD student of `config`'s student and teacher architectures (the one
    of `config`'s seed where it has several)."""
    file, source = _checkpoint_source(path)
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _error(f"{file} is not a checkpoint of tensors: refused to unpickle it") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise _error(f"{file} cannot be read: {error}") from None
    members = state.get("members") if isinstance(state, dict) else None
    if not isinstance(members, list) or not members:
        raise _error(f"{file} is not a run checkpoint of tune_kd.train (a teacher's weights?)")
    try:
        saved = [(type(config).from_dict(m["config"]), m["distiller"]) for m in members]
    except (ValueError, KeyError, TypeError) as error:
        raise _error(f"{file} holds no run configuration this version reads: {error}") from None
    methods = sorted({c.method for c, _ in saved})
    simkd = [(c, s) for c, s in saved if c.method == "simkd"]
    if not simkd:
        raise _error(f"{file} is a checkpoint of method {', '.join(methods)}, not of simkd")
    found = [(c, s) for c, s in simkd if (c.student, c.teacher) == (config.student, config.teacher)]
    if len(found) > 1:
        found = [(c, s) for c, s in found if c.seed == config.seed]
    if len(found) != 1:
        pairs = sorted({f"{c.teacher} -> {c.student} seed {c.seed}" for c, _ in simkd})
        raise _error(
            f"{file} has no single SimKD student {config.teacher} -> {config.student} "
            f"(seed {config.seed}); it has {', '.join(pairs)}"
        )
    return found[0]


def _checkpoint_source(path: str | Path) -> tuple[str, Path | io.BytesIO]:
    """The run checkpoint at `path` (a file, or a run folder holding one), named as messages name
    it, and what `torch.load` reads: the local file, or the bytes read through `Storage` of one
    under a URI."""
    if "://" not in str(path):
        file = Path(path)
        if file.is_dir():
            file = file / CHECKPOINT_NAME
        if not file.is_file():
            raise _error(f"no SimKD run checkpoint at {file}")
        return str(file), file
    location = Storage(str(path))
    if location.is_folder():
        location = Storage(location.uri_of(CHECKPOINT_NAME))
    try:
        return location.uri, io.BytesIO(location.read())
    except OSError:
        raise _error(f"no SimKD run checkpoint at {location.uri}") from None


@register
class SequentialDistiller(Distiller):
    """A frozen SimKD encoder (the student, and its last projector for `projected`) and a new
    linear classifier trained with cross-entropy."""

    name = "sequential"
    keys = (
        key(
            "sequential_from",
            None,
            "the finished SimKD run whose encoder the new classifier reads: its checkpoint.pt "
            "or run folder (none: a sweep trains the trial's own SimKD run first)",
            kind=str | None,
        ),
        key(
            "sequential_input",
            "student_pooled",
            "what the new classifier reads: student_pooled or projected",
            choices=INPUTS,
        ),
    )
    uses = ("teacher", "teacher_checkpoint")
    structure_keys = ("sequential_input",)
    # Not tried under vmap fusion: the frozen encoder would be stacked with the classifiers.
    fusable = False

    def __init__(
        self,
        student: nn.Module,
        config: Config,
        teachers: Sequence[Teacher] = (),
        train_labels: Tensor | None = None,
    ):
        super().__init__(student, config, teachers, train_labels)
        stage1_run, state = stage1_config(config), None
        if config.sequential_from is not None:
            stage1_run, state = stage1_member(config.sequential_from, config)
        stage1 = SimKDDistiller(student, stage1_run, teachers)
        if state is not None:
            try:
                stage1.load_state_dict(state)
            except RuntimeError as error:
                reason = str(error).strip().splitlines()[-1].strip()
                raise _error(f"{config.sequential_from} does not fit this run: {reason}") from None
        self.student.requires_grad_(False)
        self.student_stage = stage1.pairs[-1][0]
        self.teacher_size = stage1.teacher.stages[stage1.pairs[-1][1] - 1].size
        self.projector: SimKD | None = None
        width = feature_shapes(student)[-1][0]
        if config.sequential_input == "projected":
            self.projector = stage1.projectors[-1].requires_grad_(False)
            width = stage1.teacher.stages[-1].channels
        self.classifier = nn.Linear(width, config.num_classes)
        # The teacher only gave stage 1's shapes: no step reads its outputs.
        self.uses_teacher = False

    @classmethod
    def check_run(cls, config: Config) -> None:
        if config.sequential_from is None:
            raise _error(
                "method 'sequential' needs the finished SimKD run it starts from "
                "(a sweep of python -m tune_kd.run trains it first)"
            )

    @classmethod
    def deployed_parameters(
        cls, config: Config, student: nn.Module, teacher: nn.Module | None
    ) -> int:
        """The student without its own classifier, the last projector where the classifier
        reads its output, and the new classifier."""
        encoder = parameter_count(student) - parameter_count(student.get_classifier())
        if config.sequential_input == "student_pooled":
            width = feature_shapes(student)[-1][0]
            return encoder + (width + 1) * config.num_classes
        assert teacher is not None
        stage1 = stage1_config(config)
        shapes_s, shapes_t = stage_shapes(student), stage_shapes(teacher)
        s, t = stage_pairs(stage1.projector, len(shapes_s), len(shapes_t))[-1]
        projector = SimKD(
            shapes_s[s - 1].channels,
            shapes_t[t - 1].channels,
            factor=stage1.factor,
            design=stage1.projector_design,
        )
        width = shapes_t[-1].channels
        return encoder + parameter_count(projector) + (width + 1) * config.num_classes

    def train(self, mode: bool = True) -> SequentialDistiller:
        """Only the classifier ever trains: the encoder stays in eval mode."""
        super().train(mode)
        self.student.eval()
        if self.projector is not None:
            self.projector.eval()
        return self

    def features(self, images: Tensor) -> Tensor:
        """What the new classifier reads, [B, width], computed without gradients."""
        with torch.no_grad():
            features, _ = self.student(images, is_feat=True)
            if self.projector is None:
                return features[-1]
            projected = self.projector.project(features[self.student_stage], self.teacher_size)
            return projected.mean(dim=(2, 3))

    def forward(self, images: Tensor) -> dict[str, Any]:
        return {"logits": self.classifier(self.features(images))}

    def loss(
        self, out: dict[str, Any], batch: Batch, teachers: Sequence[TeacherOutput]
    ) -> StepOutput:
        logits = out["logits"]
        return StepOutput(losses.cross_entropy(logits, batch.labels), logits, None)

    def predict(self, images: Tensor) -> Tensor:
        return self.forward(images)["logits"]


def stage1_config(config: Config) -> Config:
    """Stage 1 as this configuration alone describes it: SimKD with its default projector, of
    the same teacher, student, seed and training keys (what the dry run's counts build before any
    stage-1 checkpoint is read, and what a sweep trains first for a trial without
    `sequential_from`)."""
    return config.replace(method="simkd", sequential_from=None, sequential_input=INPUTS[0])
