"""What every training method shares: the batch and teacher outputs its loss reads, the frozen
teacher, and the `Distiller` base class through which a method declares what it needs.

A method is one module of this package with one `Distiller` subclass, registered with
`tune_kd.distillers.registry.register`. Its class attributes say what the rest of the system
needs to know (its configuration keys, which teacher features it reads, whether it can be fused);
its `forward` and `loss` compute a training step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tune_kd import losses

if TYPE_CHECKING:
    from tune_kd.config import Config

# Keys of the configuration that several methods read; each method lists those it uses in
# `Distiller.uses` (the others are refused in its trials and left out of their labels).
DISTILLATION_KEYS = (
    "teacher",
    "teacher_checkpoint",
    "extra_teachers",
    "extra_teacher_checkpoints",
    "teacher_correct_only",
    "temperature",
    "ce_weight",
    "kd_weight",
    "feat_weight",
)

# What a method that distils from several teachers reads beside the first teacher's keys.
EXTRA_TEACHER_KEYS = ("extra_teachers", "extra_teacher_checkpoints")


# What a method that adds its own term to cross-entropy and KD reads (the official loop's
# `gamma * CE + alpha * KL + beta * L_method`).
WITH_LOGIT_TERMS = (
    "teacher",
    "teacher_checkpoint",
    "temperature",
    "ce_weight",
    "kd_weight",
    "feat_weight",
)


@dataclass(frozen=True)
class Key:
    """A configuration key that a method declares: its name, default, help and rules (the same
    rules as `tune_kd.config.Config`'s fields: `choices`, `low`, `high`, `open_low`)."""

    name: str
    default: Any
    help: str
    kind: Any = None  # the value's type; by default the default's
    rules: dict[str, Any] = field(default_factory=dict)

    @property
    def type(self) -> Any:
        return self.kind if self.kind is not None else type(self.default)


def key(name: str, default: Any, help: str, kind: Any = None, **rules: Any) -> Key:
    return Key(name, default, help, kind, rules)


@dataclass(frozen=True)
class StageShape:
    channels: int
    size: int


def feature_shapes(model: nn.Module, image_size: int = 32) -> list[tuple[int, ...]]:
    """The shape (without the batch) of every tensor of `model(x, is_feat=True)`'s feature list,
    from one small forward."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        features, _ = model(torch.zeros(1, 3, image_size, image_size, device=device), is_feat=True)
    model.train(was_training)
    return [tuple(f.shape[1:]) for f in features]


def stage_shapes(model: nn.Module, image_size: int = 32) -> list[StageShape]:
    """Channels and spatial size of each stage output (`features[1:-1]`)."""
    return [StageShape(s[0], s[-1]) for s in feature_shapes(model, image_size)[1:-1]]


def parameter_count(*modules: nn.Module) -> int:
    """Parameters of `modules` together, a parameter they share counted once."""
    unique = {id(p): p for module in modules for p in module.parameters()}
    return sum(p.numel() for p in unique.values())


def align(feat_s: Tensor, feat_t: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of the two maps to the smaller's (square) spatial size: how the
    official code pairs maps of different sizes."""
    size_s, size_t = feat_s.shape[-1], feat_t.shape[-1]
    if size_s > size_t:
        return F.adaptive_avg_pool2d(feat_s, size_t), feat_t
    if size_t > size_s:
        return feat_s, F.adaptive_avg_pool2d(feat_t, size_s)
    return feat_s, feat_t


@dataclass
class Batch:
    """One training batch: images, labels and each image's position in the training set."""

    images: Tensor
    labels: Tensor
    indices: Tensor


@dataclass
class TeacherOutput:
    """What one teacher pass gives every student of a batch."""

    logits: Tensor
    features: dict[int, Tensor]  # position in the feature list -> tensor, for those students read
    correct: Tensor  # bool per sample: the teacher's top-1 prediction is right


class Teacher:
    """A frozen teacher: eval mode, no gradients, run under `torch.inference_mode`.

    A plain object rather than a module, so that it never enters a student's state dict,
    parameters or optimizer.
    """

    def __init__(self, model: nn.Module):
        self.model = model.eval().requires_grad_(False)
        self.classifier = model.get_classifier()
        self.feature_shapes = feature_shapes(model)
        self.stages = [StageShape(s[0], s[-1]) for s in self.feature_shapes[1:-1]]

    def __call__(self, images: Tensor, labels: Tensor, features: set[int]) -> TeacherOutput:
        with torch.inference_mode():
            all_features, logits = self.model(images, is_feat=True)
            correct = logits.argmax(dim=1) == labels
        # Inference tensors cannot be saved for backward; the few that losses use are copied out.
        return TeacherOutput(
            logits=logits.clone(),
            features={i: all_features[i].clone() for i in features},
            correct=correct.clone(),
        )


@dataclass
class StepOutput:
    loss: Tensor
    logits: Tensor  # the predictions training accuracy is measured on
    kept: Tensor | None  # samples kept in the distillation term, where some may be left out


class Distiller(nn.Module):
    """Base of the methods: a student network and the modules its method trains beside it.

    A subclass declares, as class attributes:
    - `name`, and `keys`: its own configuration keys with their defaults;
    - `uses`: the shared `DISTILLATION_KEYS` it reads, and `defaults`: its values for those of
      them that default to None in the configuration (`ce_weight`, `kd_weight`, `feat_weight`);
    - `structure_keys`: its keys that change the shapes of what it trains (students that differ
      in them are not fused together, and their cost is counted apart);
    - `per_sample`: its loss is a mean over samples (so `teacher_correct_only` can leave some out);
    - `needs_indices`: it reads `Batch.indices`; `full_batches_only`: it skips a short last batch;
    - `fusable`: its students can be trained as one fused model (`tune_kd.fused`);
    - `capturable`: its step can be recorded as a CUDA graph;
    - `extra_memory_bytes`: memory its runs need beyond the networks' (the dry run prints it).
    Its `check_run(config)` refuses what it cannot train; `__init__(student, config, teachers,
    train_labels)` builds what it trains; `forward`,
    `loss` and `predict` run it. A method without a teacher sets `uses_teacher = False`.
    """

    name: ClassVar[str]
    keys: ClassVar[tuple[Key, ...]] = ()
    uses: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, float]] = {}
    structure_keys: ClassVar[tuple[str, ...]] = ()
    uses_teacher: ClassVar[bool] = True
    per_sample: ClassVar[bool] = False
    needs_indices: ClassVar[bool] = False
    full_batches_only: ClassVar[bool] = False
    fusable: ClassVar[bool] = True
    capturable: ClassVar[bool] = True

    def __init__(
        self,
        student: nn.Module,
        config: Config,
        teachers: Sequence[Teacher] = (),
        train_labels: Tensor | None = None,
    ):
        super().__init__()
        self.student = student
        self.config = config
        self.teacher_features: frozenset[int] = frozenset()  # what `loss` reads of each teacher
        self.teacher_count = len(teachers)  # the teachers whose outputs `loss` receives

    @classmethod
    def check_run(cls, config: Config) -> None:
        """Refuse (ConfigError) a configuration that can be counted but not trained: a key that
        only a run reads, not the dry run's counts, which build the method from shapes alone."""

    @classmethod
    def extra_memory_bytes(cls, config: Config, train_images: int) -> int:
        """Device memory a run of `config` needs beyond its networks and their activations (state
        kept per training image, large temporaries), on a training set of `train_images`."""
        return 0

    @classmethod
    def deployed_parameters(
        cls, config: Config, student: nn.Module, teacher: nn.Module | None
    ) -> int:
        """Parameters of the network `config`'s method deploys (`tune_kd.params`), given its
        student and teacher models: the student alone unless the method reuses teacher layers."""
        return parameter_count(student)

    def forward(self, images: Tensor) -> dict[str, Any]:
        """The trainable half of a step: what `loss` reads, from this distiller's own modules only.
        Students of one structure can therefore run it as one fused model (`tune_kd.fused`)."""
        return {"logits": self.student(images)}

    def loss(
        self, out: dict[str, Any], batch: Batch, teachers: Sequence[TeacherOutput]
    ) -> StepOutput:
        """The step's loss from `forward`'s outputs, the batch and the teachers' passes."""
        raise NotImplementedError

    def train_step(self, batch: Batch, teachers: Sequence[TeacherOutput]) -> StepOutput:
        return self.loss(self(batch.images), batch, teachers)

    def predict(self, images: Tensor) -> Tensor:
        """Logits at evaluation: the student's own classifier unless the method says otherwise."""
        return self.student(images)

    def start_epoch(self, epoch: int) -> None:
        """Called before each training epoch (1-based), for methods whose loss changes with it.
        State it sets must live in tensors updated in place: a captured step reads them."""

    def kept(self, teacher: TeacherOutput) -> Tensor | None:
        """The samples the distillation term keeps (None: all)."""
        return teacher.correct if self.config.teacher_correct_only else None

    def with_logit_terms(
        self,
        term: Tensor | float,
        logits: Tensor,
        batch: Batch,
        teacher: TeacherOutput,
    ) -> Tensor:
        """`feat_weight * term + ce_weight * CE + kd_weight * KL_T`, on the student's own logits:
        how the official code combines every method's own term with the two logit losses."""
        config = self.config
        loss = config.feat_weight * term
        if config.ce_weight:
            loss = loss + config.ce_weight * losses.cross_entropy(logits, batch.labels)
        if config.kd_weight:
            kl = losses.kl_divergence(logits, teacher.logits, config.temperature)
            loss = loss + config.kd_weight * kl.mean()
        return loss
