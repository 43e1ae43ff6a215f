"""DKD (Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation"): the KD loss split into a
target-class term (TCKD: KL of the binary [target, all others] distributions) and a non-target
term (NCKD: KL of the distributions over the other classes), weighted alpha and beta and ramped
up linearly over the first `dkd_warmup` epochs, plus cross-entropy: mdistiller's recipe.

The warm-up factor `min(epoch / dkd_warmup, 1)` lives in a buffer that `start_epoch` sets in
place, so that a captured CUDA graph reads the current epoch's value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tune_kd import losses
from tune_kd.distillers.base import Batch, Distiller, StepOutput, Teacher, TeacherOutput, key
from tune_kd.distillers.registry import register

if TYPE_CHECKING:
    from tune_kd.config import Config


def dkd_loss(
    logits_s: Tensor,
    logits_t: Tensor,
    labels: Tensor,
    alpha: float,
    beta: float,
    temperature: float,
) -> Tensor:
    """`alpha * TCKD + beta * NCKD`, each a KL divergence summed over the batch, times T^2 and
    divided by the batch size (mdistiller's `dkd_loss`)."""
    logits_s = losses.widened(logits_s) / temperature
    logits_t = losses.widened(logits_t) / temperature
    target = torch.zeros_like(logits_s).scatter_(1, labels[:, None], 1.0)  # 1 at the label
    scale = temperature**2 / labels.shape[0]

    def binary(probs: Tensor) -> Tensor:  # [p(target), p(any other class)]
        on_target = (probs * target).sum(dim=1, keepdim=True)
        return torch.cat([on_target, (probs * (1 - target)).sum(dim=1, keepdim=True)], dim=1)

    p_s, p_t = binary(F.softmax(logits_s, dim=1)), binary(F.softmax(logits_t, dim=1))
    tckd = F.kl_div(p_s.log(), p_t, reduction="sum") * scale
    # The target class pushed out of the softmax: distributions over the other classes.
    masked_s, masked_t = logits_s - 1000.0 * target, logits_t - 1000.0 * target
    nckd = (
        F.kl_div(F.log_softmax(masked_s, dim=1), F.softmax(masked_t, dim=1), reduction="sum")
        * scale
    )
    return alpha * tckd + beta * nckd


@register
class DKD(Distiller):
    name = "dkd"
    keys = (
        key("dkd_alpha", 1.0, "DKD weight alpha of the target-class term (TCKD)", low=0),
        key("dkd_beta", 8.0, "DKD weight beta of the non-target-class term (NCKD)", low=0),
        key("dkd_warmup", 20, "epochs over which DKD's loss ramps up linearly", low=1),
    )
    uses = ("teacher", "teacher_checkpoint", "temperature", "ce_weight")
    defaults: ClassVar[dict[str, float]] = {"ce_weight": 1.0}

    def __init__(
        self,
        student: nn.Module,
        config: Config,
        teachers: Sequence[Teacher] = (),
        train_labels: Tensor | None = None,
    ):
        super().__init__(student, config, teachers, train_labels)
        # min(epoch / dkd_warmup, 1), set by `start_epoch`; derived from the epoch, so not saved
        self.register_buffer("warmup", torch.zeros(()), persistent=False)

    def start_epoch(self, epoch: int) -> None:
        self.warmup.fill_(min(epoch / self.config.dkd_warmup, 1.0))

    def loss(
        self, out: dict[str, Any], batch: Batch, teachers: Sequence[TeacherOutput]
    ) -> StepOutput:
        [teacher] = teachers
        config = self.config
        logits = out["logits"]
        term = dkd_loss(
            logits,
            teacher.logits,
            batch.labels,
            config.dkd_alpha,
            config.dkd_beta,
            config.temperature,
        )
        loss = self.warmup * term
        if config.ce_weight:
            loss = loss + config.ce_weight * losses.cross_entropy(logits, batch.labels)
        return StepOutput(loss, logits, None)
