"""AEKD (Du et al., "Agree to Disagree: Adaptive Ensemble Knowledge Distillation in Gradient
Space", NeurIPS 2020), one of the multi-teacher baselines of SimKD's Table 6: cross-entropy plus a
weighted sum of the teachers' KD terms, the weights chosen anew at each step.

Each teacher's KD term pulls the student's logits along its gradient; the weights are those of the
shortest vector in the convex hull of the teachers' gradients, each weight at most `aekd_c` (the
paper's tolerance C), so that teachers that disagree cancel rather than add up. As in the authors'
code: the gradient of a teacher's batch-mean KD term with respect to the student's logits is
averaged over the batch, the weights minimise `w' G w` (G the gradients' Gram matrix) over
`0 <= w <= C, sum(w) = 1`, which is the dual of a one-class SVM of kernel G and nu = 1 / (C M),
and C is taken within [1/M, 1] for M teachers. The weights take no gradient.

The gradients are written out (`T (softmax(z/T) - softmax(t/T)) / B`, per sample) instead of one
backward pass per teacher, and the small quadratic program is solved exactly on the device by
trying every active set at once (each weight at 0, at C, or free: 3^M small linear systems), with
no host sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from tune_kd import losses
from tune_kd.distillers.aveg import AVEG
from tune_kd.distillers.base import (
    Batch,
    Distiller,
    StepOutput,
    TeacherOutput,
    key,
)
from tune_kd.distillers.registry import register


def logit_gradients(logits: Tensor, teachers: Sequence[Tensor], temperature: float) -> Tensor:
    """[M, classes]: the gradient of each teacher's batch-mean KD term with respect to the
    student's logits, averaged over the batch."""
    p_student = F.softmax(losses.widened(logits) / temperature, dim=1)
    rows = [
        temperature * (p_student - F.softmax(losses.widened(t) / temperature, dim=1))
        for t in teachers
    ]
    return torch.stack(rows).mean(dim=1) / logits.shape[0]


def active_sets(count: int, device: torch.device) -> Tensor:
    """[3^count, count]: every way to hold each of `count` weights at 0 (0), free (1) or at the
    cap (2), computed on `device` (no copy from the host inside a captured step)."""
    powers = 3 ** torch.arange(count, device=device)
    return torch.arange(3**count, device=device)[:, None] // powers % 3


def min_norm_weights(gradients: Tensor, cap: float) -> Tensor:
    """The weights w, `0 <= w <= cap` and `sum(w) = 1`, of the shortest `w @ gradients`.

    The minimum is a stationary point of the problem with each weight held at a bound or left
    free; every such choice is one linear system (the free weights' gradient rows plus a shared
    multiplier, the others at their bound, the weights summing to 1), solved all at once in
    float64. Of the solutions within the bounds, the shortest is the minimum."""
    count = gradients.shape[0]
    grads = gradients.to(torch.float64)
    gram = grads @ grads.T
    gram = gram / gram.diagonal().sum().clamp(min=torch.finfo(torch.float64).tiny)
    states = active_sets(count, grads.device)
    free, at_cap = states == 1, states == 2
    like = {"dtype": torch.float64, "device": grads.device}
    systems = torch.zeros(len(states), count + 1, count + 1, **like)
    eye = torch.eye(count, **like)
    systems[:, :count, :count] = torch.where(free[..., None], gram, eye)
    systems[:, :count, count] = free.to(torch.float64)
    systems[:, count, :count] = 1.0
    targets = torch.zeros(len(states), count + 1, **like)
    targets[:, :count] = at_cap.to(torch.float64) * cap
    targets[:, count] = 1.0
    solutions, info = torch.linalg.solve_ex(systems, targets)
    weights = solutions[:, :count]
    slack = 1e-9
    within = (weights >= -slack).all(dim=1) & (weights <= cap + slack).all(dim=1)
    within &= (info == 0) & weights.isfinite().all(dim=1)
    lengths = torch.einsum("si,ij,sj->s", weights, gram, weights)
    best = torch.where(within, lengths, torch.inf).argmin()
    return weights[best].clamp(0, cap).to(gradients.dtype)


@register
class AEKD(Distiller):
    name = "aekd"
    keys = (
        key(
            "aekd_c",
            0.6,
            "AEKD's tolerance C: the largest weight one teacher may take (within [1/M, 1] for M "
            "teachers)",
            low=0,
        ),
    )
    uses = AVEG.uses  # the teachers, the temperature and the two weights
    defaults: ClassVar[dict[str, float]] = {"ce_weight": 1.0, "kd_weight": 0.9}  # the authors'
    # Not tried under vmap fusion: the weights' linear systems would be stacked per student.
    fusable = False

    def loss(
        self, out: dict[str, Any], batch: Batch, teachers: Sequence[TeacherOutput]
    ) -> StepOutput:
        logits = out["logits"]
        temperature = self.config.temperature
        kl = torch.stack(
            [losses.kl_divergence(logits, t.logits, temperature).mean() for t in teachers]
        )
        cap = min(max(self.config.aekd_c, 1 / len(teachers)), 1.0)
        gradients = logit_gradients(logits.detach(), [t.logits for t in teachers], temperature)
        weights = min_norm_weights(gradients, cap)
        loss = self.config.kd_weight * (weights * kl).sum()
        if self.config.ce_weight:
            loss = loss + self.config.ce_weight * losses.cross_entropy(logits, batch.labels)
        return StepOutput(loss, logits, None)
