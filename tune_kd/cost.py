"""How much compute a plan needs: FLOPs of one training step, counted, and GPU-hours, estimated."""

from __future__ import annotations

import functools

import torch
import torch.utils.flop_counter

from tune_kd import distillers, models
from tune_kd.config import Config, resolve

# Training throughput of one GPU in FLOPs per second (forward and backward, all models of a step):
# ResNet-32x4 -> ResNet-8x4 SimKD at batch 64, bf16, channels_last, each step one CUDA graph,
# measured on one H100 by bench/gpu.sh: 26,962 images/s x 3.31 GFLOP per image
# (docs/PERFORMANCE.md). Small CIFAR networks use a modest share of the chip.
GPU_FLOPS_PER_SECOND = 89e12

DATASET_SIZES = {"cifar100": 50_000, "cifar10": 50_000}


def train_images(config: Config) -> int:
    """Images in one training epoch."""
    size = DATASET_SIZES.get(config.dataset, config.synthetic_train_size)
    return size - config.val_size


@functools.cache
def _step_flops(
    teacher: str | None,
    student: str,
    method: str,
    projector: str,
    design: str,
    factor: int,
    classes: int,
) -> float:
    config = resolve(
        Config(
            dataset="synthetic",
            synthetic_classes=classes,
            teacher=teacher,
            student=student,
            method=method,
            projector=projector,
            projector_design=design,
            factor=factor,
            device="cpu",
        )
    )
    torch.manual_seed(0)
    teacher_model = distillers.Teacher(models.create(teacher, classes)) if teacher else None
    distiller = distillers.create(config, models.create(student, classes), teacher_model)
    images, labels = torch.randn(2, 3, 32, 32), torch.arange(2) % classes
    stages = set(distiller.teacher_stages)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        out = teacher_model(images, labels, stages) if distiller.uses_teacher else None
        distiller.train_step(images, labels, out).loss.backward()
    return counter.get_total_flops() / len(images)


def step_flops(config: Config) -> float:
    """FLOPs per training image: the teacher's forward and the student's forward and backward,
    projectors included (counted with torch's FLOP counter on a CPU forward of two images)."""
    classes = config.num_classes
    teacher = config.teacher if config.method != "student" else None
    return _step_flops(
        teacher,
        config.student,
        config.method,
        config.projector,
        config.projector_design,
        config.factor,
        classes,
    )


def gpu_hours(config: Config, gpu_flops_per_second: float = GPU_FLOPS_PER_SECOND) -> float:
    """Estimated GPU-hours of one run of `config` from its FLOPs and a measured GPU throughput."""
    return train_images(config) * config.epochs * step_flops(config) / gpu_flops_per_second / 3600
