"""Variational information distillation (Ahn et al., CVPR 2019), as the SimKD code trains it: for
each pair of stage outputs (`feat[1:-1]` of both networks, paired in order, the longer list's extra
last stages left out), a regressor of three 1x1 convolutions (ReLU between them, no biases, as wide
as the teacher map) predicts the teacher's map as the mean of a Gaussian whose variance per channel
is `softplus(log_scale) + 1e-5`, learnt, starting at 5. The loss is the Gaussian's negative
log-likelihood without its constant, `0.5 * ((mean - t)^2 / var + log var)`, averaged over batch,
channels and positions, summed over the pairs. Of two maps of different heights the larger is
average-pooled to the smaller's size (the student's before its regressor).

Deliberate difference: the variance is `softplus(log_scale)`, where the official code writes
`log(1 + exp(log_scale))`; the two are equal (to rounding) below softplus's threshold of 20, and
softplus does not overflow above it.
"""

from __future__ import annotations

import math
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
    StepOutput,
    Teacher,
    TeacherOutput,
    align,
    stage_shapes,
)
from tune_kd.distillers.registry import register

if TYPE_CHECKING:
    from tune_kd.config import Config

INITIAL_VARIANCE = 5.0
EPS = 1e-5  # the variance's floor


class VIDRegressor(nn.Module):
    """Mean and variance of the Gaussian predicting a teacher map from a student map. Attribute
    names (`regressor`, `log_scale`) match the official module's, so its weights load."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int):
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, out_channels, 1, bias=False),
        )
        start = math.log(math.expm1(INITIAL_VARIANCE - EPS))  # softplus(start) + EPS = 5
        self.log_scale = nn.Parameter(torch.full((out_channels,), start))

    def forward(self, feat_s: Tensor, teacher_size: int) -> tuple[Tensor, Tensor]:
        """The predicted mean (from the student map, pooled first to the teacher map's size
        where it is larger) and the variance per channel."""
        if feat_s.shape[-1] > teacher_size:
            feat_s = F.adaptive_avg_pool2d(feat_s, (teacher_size, teacher_size))
        return self.regressor(feat_s), F.softplus(self.log_scale) + EPS


def vid_loss(
    means: Sequence[Tensor], variances: Sequence[Tensor], teacher_maps: Sequence[Tensor]
) -> Tensor:
    """Sum over the pairs of the Gaussian negative log-likelihood without its constant, averaged
    over all elements; each teacher map is pooled to its mean's size where it is larger."""
    total: Tensor | float = 0.0
    for mean, variance, feat_t in zip(means, variances, teacher_maps):
        _, target = align(mean, feat_t)
        variance = variance.view(1, -1, 1, 1)
        total = total + (0.5 * ((mean - target).pow(2) / variance + variance.log())).mean()
    return total


@register
class VID(Distiller):
    name = "vid"
    uses = WITH_LOGIT_TERMS
    defaults: ClassVar[dict[str, float]] = {"ce_weight": 1.0, "kd_weight": 1.0, "feat_weight": 1.0}

    def __init__(
        self,
        student: nn.Module,
        config: Config,
        teachers: Sequence[Teacher] = (),
        train_labels: Tensor | None = None,
    ):
        super().__init__(student, config, teachers, train_labels)
        [teacher] = teachers
        pairs = list(zip(stage_shapes(student), teacher.stages))
        self.regressors = nn.ModuleList(
            VIDRegressor(s.channels, t.channels, t.channels) for s, t in pairs
        )
        self.teacher_sizes = [t.size for _, t in pairs]
        self.teacher_features = frozenset(range(1, len(pairs) + 1))

    def forward(self, images: Tensor) -> dict[str, Any]:
        """Each pair's predicted mean and variance: of the teacher it needs only map sizes."""
        features, logits = self.student(images, is_feat=True)
        predicted = [
            regressor(features[i + 1], size)
            for i, (regressor, size) in enumerate(zip(self.regressors, self.teacher_sizes))
        ]
        return {
            "means": [mean for mean, _ in predicted],
            "variances": [variance for _, variance in predicted],
            "logits": logits,
        }

    def loss(
        self, out: dict[str, Any], batch: Batch, teachers: Sequence[TeacherOutput]
    ) -> StepOutput:
        [teacher] = teachers
        term = vid_loss(
            [losses.widened(mean) for mean in out["means"]],
            [losses.widened(variance) for variance in out["variances"]],
            [losses.widened(teacher.features[i + 1]) for i in range(len(self.regressors))],
        )
        logits = out["logits"]
        return StepOutput(self.with_logit_terms(term, logits, batch, teacher), logits, None)
