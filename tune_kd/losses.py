"""Distillation losses, each returning one value per sample.

Per-sample losses let `teacher_correct_only` leave samples out of a batch's distillation term
without changing the loss of the others; `masked_mean` averages what is left without a host sync.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_divergence(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2-scaled KL(teacher || student) of the softened class distributions (Hinton et al.)."""
    log_p_student = F.log_softmax(widened(student_logits) / temperature, dim=1)
    log_p_teacher = F.log_softmax(widened(teacher_logits) / temperature, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return kl * temperature**2


def l2(projected: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample; its batch mean is `F.mse_loss(projected, target)`."""
    return (widened(projected) - widened(target)).pow(2).flatten(1).mean(dim=1)


def cosine(projected: Tensor, target: Tensor) -> Tensor:
    """1 - cosine similarity of the flattened feature maps, per sample."""
    return 1 - F.cosine_similarity(widened(projected).flatten(1), widened(target).flatten(1), dim=1)


FeatureLoss = Callable[[Tensor, Tensor], Tensor]
FEATURE_LOSSES: dict[str, FeatureLoss] = {"l2": l2, "cosine": cosine}


def masked_mean(values: Tensor, keep: Tensor | None) -> Tensor:
    """Mean of `values` over the samples where `keep` is true (0 when none is kept)."""
    if keep is None:
        return values.mean()
    keep = keep.to(values.dtype)
    return (values * keep).sum() / keep.sum().clamp(min=1)


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(widened(logits), labels)


def correct_top1_top5(logits: Tensor, labels: Tensor) -> Tensor:
    """Counts of top-1 and top-5 hits, as a 2-element tensor on the logits' device."""
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top5 == labels[:, None]
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])


def widened(values: Tensor) -> Tensor:
    """`values` in float32 where they are narrower (bf16 under autocast); float64 stays float64,
    so that a loss can be checked against float64 reference values."""
    return values if values.dtype == torch.float64 else values.float()
