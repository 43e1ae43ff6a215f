"""tune_kd.cost: the GPU-hours a dry run prints reproduce the study's measured figures
(docs/PERFORMANCE.md, "GPU-hours of the shipped study files"), and the model of a trial's time
keeps the properties it is built on."""

from __future__ import annotations

from pathlib import Path

import pytest

from tune_kd import cost, run
from tune_kd import space as spaces
from tune_kd.config import Config, resolve

STUDY = Path(__file__).parents[1] / "search_spaces" / "study_losses.yaml"


@pytest.fixture(scope="module")
def study() -> spaces.Space:
    return spaces.load(STUDY)


def alone_hours(space: spaces.Space) -> float:
    return sum(cost.gpu_hours(t.config) for t in space.trials)


def grouped_hours(space: spaces.Space, fuse: bool) -> float:
    return sum(
        cost.group_gpu_hours([t.config.replace(fuse_students=fuse) for t in group])
        for group in space.groups
    )


def teacher_hours(space: spaces.Space) -> float:
    return sum(cost.gpu_hours(need.recipe) for need in space.teachers if need.recipe)


def test_the_first_grid_costs_what_it_cost_on_the_h100(study):
    """45 trials of WRN-40-2 -> ResNet-8x4 on CIFAR-100: 5.2 GPU-hours one trial at a time and
    3.1 in groups of 15 sharing the teacher's pass, as measured."""
    assert study.planned == 45 and [len(g) for g in study.groups] == [15, 15, 15]
    assert round(alone_hours(study), 1) == 5.2
    assert round(grouped_hours(study, fuse=False), 1) == 3.1


# docs/PERFORMANCE.md's table: file -> GPU-hours alone, grouped one after another, grouped and
# fused (at the fused rate measured on an H200), and of the teachers trained first.
TABLE = {
    "study_losses.yaml": (5.2, 3.1, 4.0, 0.1),
    "study_multi_projector.yaml": (2.1, 1.2, 1.6, 0.4),
    "study_all_projectors.yaml": (2.2, 1.3, 1.7, 0.4),
    "study_teacher_correct.yaml": (2.1, 1.2, 1.6, 0.4),
}


@pytest.mark.parametrize(("name", "table"), TABLE.items())
def test_the_study_files_cost_what_the_performance_notes_say(name, table):
    space = spaces.load(STUDY.parent / name)
    estimates = (
        alone_hours(space),
        grouped_hours(space, fuse=False),
        grouped_hours(space, fuse=True),
        teacher_hours(space),
    )
    assert tuple(round(hours, 1) for hours in estimates) == table


def test_the_dry_run_prints_the_estimate_with_and_without_groups(study, tmp_path, capsys):
    """By default the study's groups train one after another; the dry run adds the teacher
    trained first."""
    with_teacher = grouped_hours(study, fuse=False) + teacher_hours(study)
    one_at_a_time = alone_hours(study) + teacher_hours(study)
    storage = tmp_path / "results"
    assert run.main(["--dry-run", "--space", str(STUDY), "--storage", str(storage)]) == 0
    expected = f"{with_teacher:.1f} GPU-hours ({one_at_a_time:.1f} one trial at a time)"
    assert f"estimated compute: {expected}" in capsys.readouterr().out
    assert expected == "3.2 GPU-hours (5.3 one trial at a time)"


def hours(config: Config, seconds_per_image: float) -> float:
    """GPU-hours of `config`'s epochs at `seconds_per_image`."""
    return cost.train_images(config) * config.epochs * seconds_per_image / 3600


def test_a_group_saves_exactly_the_teacher_passes_it_shares(study):
    """Alone, every trial pays the teacher's forward; a group of 15 pays it once."""
    teacher = hours(study.trials[0].config, cost.teacher_seconds(study.trials[0].config))
    assert teacher > 0
    saved = alone_hours(study) - grouped_hours(study, fuse=False)
    assert saved == pytest.approx(3 * 14 * teacher)


def test_grouping_saves_and_fusing_costs_more_than_one_after_another(study):
    for group in study.groups:
        configs = [t.config for t in group]
        alone = sum(cost.gpu_hours(c) for c in configs)
        one_after_another = cost.group_gpu_hours([c.replace(fuse_students=False) for c in configs])
        fused = cost.group_gpu_hours([c.replace(fuse_students=True) for c in configs])
        assert one_after_another < alone and one_after_another < fused  # as measured on an H200
        assert fused >= cost.gpu_hours(configs[0])  # 15 fused students: at least one's time


def small(**keys) -> Config:
    """A CIFAR-100 run of unmeasured passes: costed by their FLOPs."""
    values = {"dataset": "cifar100", "teacher": "resnet20", "student": "resnet8", **keys}
    return Config.from_dict({"epochs": 10, "lr_decay_epochs": [5], **values})


def test_a_fused_sub_group_costs_its_flops_at_the_fused_rate_and_never_less_than_one_student():
    """A fused pass runs its students' FLOPs at the measured fused rate, clamped below at one
    student's step; one after another they pay a step each, and the teacher's pass once."""
    one = small(fuse_students=True)
    pair = [one, one.replace(seed=1)]
    teacher, student = cost.teacher_seconds(one), cost.student_seconds(one)
    assert teacher > 0 and student > 0
    fused = max(student, 2 * cost.pass_flops(one)[1] / cost.FUSED_FLOPS_PER_SECOND)
    assert cost.group_gpu_hours(pair) == pytest.approx(hours(one, teacher + fused))
    assert cost.gpu_hours(one) == pytest.approx(hours(one, teacher + student))
    apart = [c.replace(fuse_students=False) for c in pair]
    assert cost.group_gpu_hours(apart) == pytest.approx(hours(one, teacher + 2 * student))


def test_students_of_other_structures_are_not_fused_together():
    """A resnet8 and a resnet14 student: two sub-groups of one, a step each."""
    first, other = small(fuse_students=True), small(fuse_students=True, student="resnet14")
    steps = cost.teacher_seconds(first) + cost.student_seconds(first) + cost.student_seconds(other)
    assert cost.group_gpu_hours([first, other]) == pytest.approx(hours(first, steps))


def test_a_heavier_teacher_or_student_costs_more():
    light = small()
    assert cost.gpu_hours(light.replace(teacher="resnet110")) > cost.gpu_hours(light)
    assert cost.gpu_hours(light.replace(student="resnet32")) > cost.gpu_hours(light)
    assert cost.gpu_hours(light.replace(method="student")) < cost.gpu_hours(light)


def test_flops_count_the_teachers_forward_and_the_projectors():
    simkd, kd, alone = small(), small(method="kd"), small(method="student")
    assert cost.pass_flops(alone)[0] == 0  # no teacher
    assert cost.pass_flops(simkd)[0] > 0 and cost.pass_flops(kd)[0] > 0
    assert cost.pass_flops(simkd)[1] > cost.pass_flops(alone)[1]  # the projector's step
    # measured passes are taken as measured
    measured = Config.from_dict({"teacher": "resnet38x2", "student": "resnet8x4"})
    assert cost.teacher_seconds(measured) == cost.TEACHER_FORWARD_SECONDS["resnet38x2"]
    assert cost.student_seconds(measured) == cost.STUDENT_STEP_SECONDS["resnet8x4"]


def test_cost_is_proportional_to_epochs_and_training_images():
    config = small()
    assert cost.gpu_hours(config.replace(epochs=20)) == pytest.approx(2 * cost.gpu_hours(config))
    assert cost.train_images(config) == 50_000
    held_out = config.replace(val_size=10_000)
    assert cost.train_images(held_out) == 40_000
    assert cost.gpu_hours(held_out) == pytest.approx(0.8 * cost.gpu_hours(config))
    synthetic = small(dataset="synthetic", synthetic_train_size=500, synthetic_classes=100)
    assert cost.train_images(synthetic) == 500


def test_a_method_costs_the_measured_step_plus_what_it_computes_beyond_simkd():
    """KD computes less than SimKD but its small step is no faster: the measured step. SemCKD's
    projectors for every stage pair add their FLOPs at the measured rate."""
    base = {"dataset": "cifar100", "teacher": "resnet32x4", "student": "resnet8x4"}
    simkd, kd, semckd = (
        resolve(Config.from_dict({**base, "method": m})) for m in ("simkd", "kd", "semckd")
    )
    assert cost.student_seconds(simkd) == cost.student_seconds(kd) == 19.73e-6
    extra = cost.pass_flops(semckd)[1] - cost.pass_flops(simkd)[1]
    assert extra > 0
    assert cost.student_seconds(semckd) == pytest.approx(
        19.73e-6 + extra / cost.STUDENT_FLOPS_PER_SECOND
    )
