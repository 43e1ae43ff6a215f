"""How much compute a plan needs: FLOPs of one training step, counted, and GPU-hours, estimated
from throughput measured on one H100.

At batch 64 a GPU is not bound by arithmetic: a step's time is mostly each network pass's many
small kernels, so a lighter teacher barely helps, while fusing students removes a pass per
student. A Ray trial's time per training image is therefore modelled as the sum of its passes:
the teacher's forward, each student's step alone, and each fused sub-group's step.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.utils.flop_counter

from tune_kd import distillers, fused, models
from tune_kd.config import DATA_KEYS, Config, resolve

# Seconds per training image of each pass on one H100 (bf16, channels_last, each step one CUDA
# graph, batch 64), from three measured throughputs (docs/PERFORMANCE.md): ResNet-32x4 ->
# ResNet-8x4 alone 26,962 images/s; WRN-40-2 (resnet38x2) -> ResNet-8x4 alone 28,965; and 15
# ResNet-8x4 students sharing WRN-40-2's pass one after another 48,271 student-images/s. Then
# teacher + student = 34.52 us and teacher + 15 students = 310.75 us give the student's step
# 19.73 us and WRN-40-2's forward 14.79 us; ResNet-32x4's forward is 37.09 - 19.73 = 17.36 us.
TEACHER_FORWARD_SECONDS = {"resnet38x2": 14.79e-6, "resnet32x4": 17.36e-6}
STUDENT_STEP_SECONDS = {"resnet8x4": 19.73e-6}
MEASURED_TEACHER = "resnet32x4"  # a teacher for a student trained alone, to compare with
# A pass not measured: its FLOPs at the effective rate of the measured pass of its kind.
TEACHER_FLOPS_PER_SECOND = 2.166e9 / 17.36e-6  # ResNet-32x4's forward, 125 TFLOP/s
STUDENT_FLOPS_PER_SECOND = 1.084e9 / 19.73e-6  # ResNet-8x4's SimKD step, 55 TFLOP/s
# A fused sub-group: never faster than one of its students alone, and its students' FLOPs at the
# rate measured for 15 fused ResNet-8x4 SimKD students with WRN-40-2 on one H200: 37,182
# student-images/s, so 403.4 us per image, 388.6 us of it the fused step (42 TFLOP/s).
FUSED_FLOPS_PER_SECOND = 15 * 1.084e9 / 388.6e-6

DATASET_SIZES = {"cifar100": 50_000, "cifar10": 50_000}
# The images of a counted step.
COUNTED_IMAGES = torch.arange(4)  # SemCKD embeds batch-sized rows into a quarter of them
# Training images a counted step's distiller keeps state for (a memory bank's rows): FLOPs per
# image do not depend on it.
COUNTED_TRAIN_IMAGES = 64


def train_images(config: Config) -> int:
    """Images in one training epoch."""
    size = DATASET_SIZES.get(config.dataset, config.synthetic_train_size)
    return size - config.val_size


@functools.cache
def _pass_flops(
    teacher: str | None,
    student: str,
    method: str,
    structure: tuple[tuple[str, Any], ...],
    classes: int,
) -> tuple[float, float]:
    config = resolve(
        Config(
            dataset="synthetic",
            synthetic_classes=classes,
            teacher=teacher,
            student=student,
            method=method,
            batch_size=len(COUNTED_IMAGES),  # a method sized by the batch (SemCKD) counts as one
            device="cpu",
            **dict(structure),
        )
    )
    torch.manual_seed(0)
    with one_thread():
        return _count(config, teacher, student, classes)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Two images are too little work to share: more threads only spin, and on a busy machine
    their waits multiply the time tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _count(config: Config, teacher: str | None, student: str, classes: int) -> tuple[float, float]:
    train_labels = torch.arange(COUNTED_TRAIN_IMAGES) % classes
    teachers = [_teacher(teacher, classes)] if teacher else []
    distiller = distillers.create(config, _student(student, classes), teachers, train_labels)
    features = tuple(sorted(distiller.teacher_features))
    teacher_flops, outs = _teacher_pass(teacher, classes, features) if teacher else (0.0, [])
    images = torch.randn(len(COUNTED_IMAGES), 3, 32, 32)
    batch = distillers.Batch(images, COUNTED_IMAGES % classes, COUNTED_IMAGES)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        distiller.train_step(batch, outs).loss.backward()
    return teacher_flops, counter.get_total_flops() / len(batch.images)


def _student(name: str, classes: int) -> torch.nn.Module:
    """A fresh student: a copy of one built per architecture (copying is faster than building,
    and its FLOPs do not depend on its weights)."""
    return copy.deepcopy(_built(name, classes))


_built = functools.cache(models.create)


@functools.cache
def _teacher(name: str, classes: int) -> distillers.Teacher:
    """One teacher per architecture for all counts: its FLOPs do not depend on its weights."""
    return distillers.Teacher(models.create(name, classes))


@functools.cache
def _teacher_pass(
    name: str, classes: int, features: tuple[int, ...]
) -> tuple[float, list[distillers.TeacherOutput]]:
    """The teacher's FLOPs per image and its outputs, counted once for every student."""
    images = torch.randn(len(COUNTED_IMAGES), 3, 32, 32)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        out = _teacher(name, classes)(images, COUNTED_IMAGES % classes, set(features))
    return counter.get_total_flops() / len(images), [out]


def pass_flops(config: Config) -> tuple[float, float]:
    """FLOPs per training image of the teacher's forward and of the student's forward and
    backward, projectors included (counted with torch's FLOP counter on two CPU images)."""
    method = distillers.get(config.method)
    teacher = config.teacher if method.uses_teacher else None
    structure = tuple((k, getattr(config, k)) for k in method.structure_keys)
    return _pass_flops(teacher, config.student, config.method, structure, config.num_classes)


def teacher_seconds(config: Config) -> float:
    """Seconds per training image of the teacher's forward (none for a method without one)."""
    if not distillers.get(config.method).uses_teacher:
        return 0.0
    measured = TEACHER_FORWARD_SECONDS.get(config.teacher or "")
    return measured if measured is not None else pass_flops(config)[0] / TEACHER_FLOPS_PER_SECOND


def student_seconds(config: Config) -> float:
    """Seconds per training image of one student's step alone: the measured SimKD step of its
    architecture, plus what this method computes beyond SimKD's step at the measured rate (small
    steps are bound by their kernels' count, not their FLOPs: less work does not make them
    faster)."""
    measured = STUDENT_STEP_SECONDS.get(config.student)
    if measured is None:
        return pass_flops(config)[1] / STUDENT_FLOPS_PER_SECOND
    data = {k: getattr(config, k) for k in DATA_KEYS}
    teacher = config.teacher or MEASURED_TEACHER
    simkd = Config(teacher=teacher, student=config.student, method="simkd", **data)
    extra = pass_flops(config)[1] - pass_flops(simkd)[1]
    return measured + max(extra, 0.0) / STUDENT_FLOPS_PER_SECOND


def group_gpu_hours(configs: Sequence[Config]) -> float:
    """Estimated GPU-hours of one Ray trial training `configs` together (a group of one: alone),
    their fused sub-groups fused where the group's `fuse_students` is on."""
    first = configs[0]
    seconds = teacher_seconds(first)
    if first.fuse_students:
        parts = [[configs[i] for i in part] for part in fused.partition(configs)]
    else:
        parts = [[c] for c in configs]
    for part in parts:
        alone = student_seconds(part[0])
        if len(part) == 1:
            seconds += alone
        else:
            work = sum(pass_flops(c)[1] for c in part) / FUSED_FLOPS_PER_SECOND
            seconds += max(alone, work)
    return train_images(first) * first.epochs * seconds / 3600


def gpu_hours(config: Config) -> float:
    """Estimated GPU-hours of one run of `config` alone."""
    return group_gpu_hours([config])
