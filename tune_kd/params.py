"""Deployed parameters and pruning ratio of a configuration.

The network a trained configuration deploys is the student, except for the methods that reuse
teacher layers (SimKD: the teacher's classifier; `reuse`: the teacher after stage k); each method
counts its own (`Distiller.deployed_parameters`). The pruning ratio is the paper's (Chen et al.,
CVPR 2022, Table S.10): `1 - (#param_se + #param_proj + Δ) / #param_t`, Δ = #param_tc -
#param_sc, in percent truncated to two decimals. Every parameter counts, batch norm's included,
and #param_se is the whole student, its own classifier included: so counted, our ResNet-8x4 and
ResNet-32x4 give the printed 83.40 % (student) and 80.52 % (SimKD) exactly.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from tune_kd import distillers, models
from tune_kd.config import Config
from tune_kd.distillers.base import parameter_count


@dataclass(frozen=True)
class Deployed:
    """What a configuration deploys: its parameters, the reference teacher's, the ratio."""

    parameters: int
    teacher_parameters: int | None
    pruning_ratio: float | None  # percent, truncated to two decimals; None without a teacher


def truncated_percent(fraction: float) -> float:
    """`fraction` in percent, truncated (not rounded) to two decimals, as the paper prints it."""
    return math.floor(round(fraction * 1e4, 6)) / 100


def deployed(config: Config, teacher: str | None = None) -> Deployed:
    """Deployed parameters of `config` and its pruning ratio against its teacher, or against
    `teacher` for a method without one (the student baseline); no ratio without either."""
    method = distillers.get(config.method)
    reference = config.teacher if method.uses_teacher else teacher
    return _deployed(
        config.method, config.student, reference, config.num_classes, distillers.structure(config)
    )


@functools.cache
def _deployed(
    method: str, student: str, teacher: str | None, num_classes: int, structure: tuple
) -> Deployed:
    """`deployed` once per distinct (method, networks, structure): building the models is slow."""
    cls = distillers.get(method)
    values = {
        "method": method,
        "student": student,
        "teacher": teacher if cls.uses_teacher else None,
    }
    config = Config.from_dict({**values, **dict(zip(cls.structure_keys, structure, strict=True))})
    student_model = _model(student, num_classes)
    teacher_model = _model(teacher, num_classes) if teacher else None
    uses = teacher_model if cls.uses_teacher else None
    count = cls.deployed_parameters(config, student_model, uses)
    if teacher_model is None:
        return Deployed(count, None, None)
    total = parameter_count(teacher_model)
    return Deployed(count, total, truncated_percent(1 - count / total))


@functools.cache
def _model(name: str, num_classes: int) -> nn.Module:
    """An architecture on the meta device: shapes and counts without memory or initialisation."""
    with torch.device("meta"):
        return models.create(name, num_classes)
