"""The `reuse` method (the student up to stage k, then the frozen teacher: the paper's SimKD+ and
SimKD++), the models' stages it runs, and the deployed parameters and pruning ratios of
tune_kd.params against the paper's Table S.10."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from tune_kd import distillers, models, run
from tune_kd.config import Config, resolve
from tune_kd.distillers import Batch, Teacher
from tune_kd.distillers.base import parameter_count
from tune_kd.distillers.simkd import make_projector
from tune_kd.params import deployed, truncated_percent
from tune_kd.train import Run, main

# One model of each family, and the pairs the method is built for.
FAMILY_MODELS = ["resnet8", "ResNet50", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2"]
PAIRS = [
    ("resnet8x4", "resnet32x4", 2),
    ("vgg8", "vgg13", 3),
    ("wrn_16_2", "wrn_40_2", 1),
    ("MobileNetV2", "ResNet50", 2),
    ("ShuffleV2", "resnet32x4", 2),
]


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_running_the_stages_in_two_parts_gives_the_forward(name):
    torch.manual_seed(0)
    model = models.create(name, 10).eval()
    images = torch.randn(2, 3, 32, 32)
    features, logits = model(images, is_feat=True)
    assert len(features) == model.num_stages + 2
    for k in range(model.num_stages + 1):
        head = model.run_stages(images, 0, k)
        tail = model.run_stages(head[-1], k + 1, model.num_stages + 1)
        assert all(torch.equal(a, b) for a, b in zip(head + tail, features, strict=True))
        assert torch.equal(model.get_classifier()(tail[-1]), logits)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_the_stages_and_the_classifier_hold_every_parameter_once(name):
    model = models.create(name, 10)
    parts = [m for i in range(model.num_stages + 2) for m in model.stage_modules(i)]
    each = sum(parameter_count(m) for m in [*parts, model.get_classifier()])
    assert each == parameter_count(model) == parameter_count(*parts, model.get_classifier())


def cpu_config(student: str, teacher: str, method: str = "reuse", **keys) -> Config:
    values = {"method": method, "student": student, "teacher": teacher, "device": "cpu", **keys}
    return resolve(Config.from_dict(values))


@pytest.mark.parametrize(("student", "teacher", "stage"), PAIRS)
def test_reuse_builds_and_trains_a_step_for_pairs_of_every_family(student, teacher, stage):
    torch.manual_seed(0)
    teacher_model = Teacher(models.create(teacher, 10))
    config = cpu_config(student, teacher, reuse_stage=stage)
    distiller = distillers.create(config, models.create(student, 10), [teacher_model])
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    batch = Batch(images, labels, torch.arange(4))
    out = distiller.train_step(batch, [teacher_model(images, labels, distiller.teacher_features)])
    out.loss.backward()
    assert out.logits.shape == (4, 10) and out.loss.item() > 0
    assert distiller.projector.transfer[0].weight.grad is not None
    # The student's own classifier comes after stage k: no gradient.
    assert all(p.grad is None for p in distiller.student.get_classifier().parameters())
    assert all(p.grad is None for p in teacher_model.model.parameters())
    assert torch.equal(distiller.predict(images), out.logits)


def test_reuse_past_a_networks_last_stage_is_refused():
    config = cpu_config("resnet8", "resnet14", reuse_stage=4)
    with pytest.raises(ValueError, match="past the last stage"):
        distillers.create(
            config, models.create("resnet8", 10), [Teacher(models.create("resnet14", 10))]
        )


def test_reuse_from_the_last_stage_is_simkd():
    """Same weights, same batch: the same loss, training logits and predictions as SimKD."""
    torch.manual_seed(0)
    teacher = Teacher(models.create("resnet32x4", 10))
    student = models.create("resnet8x4", 10)
    simkd = distillers.create(cpu_config("resnet8x4", "resnet32x4", "simkd"), student, [teacher])
    reuse = distillers.create(
        cpu_config("resnet8x4", "resnet32x4"), copy.deepcopy(student), [teacher]
    )
    reuse.projector.load_state_dict(simkd.projectors[0].state_dict())
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8)
    batch = Batch(images, labels, torch.arange(8))
    assert reuse.teacher_features == simkd.teacher_features
    passed = [teacher(images, labels, set(simkd.teacher_features))]
    ours, theirs = reuse.train_step(batch, passed), simkd.train_step(batch, passed)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reuse.predict(images), simkd.predict(images), rtol=1e-5, atol=1e-6)


def test_the_reused_teacher_stays_frozen_and_in_eval_mode_through_training(tiny):
    run = Run([{**tiny, "method": "reuse", "reuse_stage": 2, "epochs": 1}])
    teacher = run.teacher.model
    before = copy.deepcopy(teacher.state_dict())  # weights and batch-norm statistics
    member = run.members[0]
    student_before = copy.deepcopy(member.distiller.student.layer1.state_dict())
    run.train_epoch()
    assert not teacher.training and all(not m.training for m in teacher.modules())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    optimized = {id(p) for group in member.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    trained = member.distiller.student.layer1.state_dict()
    assert any(not torch.equal(student_before[k], trained[k]) for k in trained)


def test_reuse_trains_two_epochs_through_the_command_line(tiny, tmp_path):
    flags = []
    config = {**tiny, "method": "reuse", "reuse_stage": 2, "reuse_factor": 4}
    for key, value in config.items():
        flags += [f"--{key.replace('_', '-')}", json.dumps(value).strip('"')]
    assert main([*flags, "--out", str(tmp_path / "run")]) == 0
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["train_loss"] > 0 and not r["diverged"] for r in rows)


def paper_config(method: str, **keys) -> Config:
    teacher = {} if method == "student" else {"teacher": "resnet32x4"}
    return Config.from_dict({"method": method, "student": "resnet8x4", **teacher, **keys})


def test_the_published_pruning_ratios_of_the_student_and_simkd():
    """Table S.10: ResNet-8x4 from ResNet-32x4, 83.40 % (student, and KD's dashed line in Figure
    6) and 80.52 % (SimKD, factor 2), from every parameter of our models, truncated."""
    assert deployed(paper_config("student"), "resnet32x4").pruning_ratio == 83.40
    assert deployed(paper_config("kd")).pruning_ratio == 83.40
    assert deployed(paper_config("simkd", factor=2)).pruning_ratio == 80.52
    assert deployed(paper_config("reuse")).pruning_ratio == 80.52  # reuse from the last stage
    assert deployed(paper_config("student")).pruning_ratio is None  # no teacher to compare


def test_reuse_counts_the_student_up_to_k_the_projector_and_the_teacher_after_k():
    student, teacher = models.create("resnet8x4", 100), models.create("resnet32x4", 100)
    kept = parameter_count(student.conv1, student.bn1, student.layer1, student.layer2)
    reused = parameter_count(teacher.layer3, teacher.fc)
    expected = kept + parameter_count(make_projector("1x1-3x3-1x1", 128, 128, 2)) + reused
    result = deployed(paper_config("reuse", reuse_stage=2))
    assert result.parameters == expected
    assert result.pruning_ratio == truncated_percent(1 - expected / parameter_count(teacher))
    # More of the teacher reused, less pruned: SimKD > k = 2 > k = 1.
    assert (
        80.52 > result.pruning_ratio > deployed(paper_config("reuse", reuse_stage=1)).pruning_ratio
    )


def test_truncation_does_not_round():
    assert truncated_percent(0.805275) == 80.52
    assert truncated_percent(0.834065) == 83.40
    assert truncated_percent(0.8053) == 80.53  # no float error below an exact value


def reuse_experiment(root) -> str:
    """One completed trial each of the student, KD, SimKD and reuse from stage 2."""
    from test_analysis import curve, engine_rows, tune_line, write_lines, write_params, write_plan

    cells = [
        {"method": "student"},
        {"method": "kd", "teacher": "resnet32x4"},
        {"method": "simkd", "teacher": "resnet32x4"},
        {"method": "reuse", "teacher": "resnet32x4", "reuse_stage": 2},
    ]
    trials = []
    for index, cell in enumerate(cells):
        labels = {"student": "resnet8x4", "teacher": None, "reuse_stage": None, **cell, "seed": 0}
        config = {
            "epochs": 4,
            "lr_decay_epochs": [2],
            **{k: v for k, v in labels.items() if v is not None},
        }
        trials.append({"index": index, "axes": {}, "labels": labels, "config": config})
        folder = root / f"group_{index:04d}"
        write_params(folder, {"index": index, "students": 1})
        rows = engine_rows(curve(70 + index))
        write_lines(folder, [tune_line(row, index, 900.0) for row in rows])
    write_plan(root, trials, [[i] for i in range(len(cells))])
    return str(root)


def test_an_experiment_with_reuse_trials_has_pruning_ratios_and_their_plot(tmp_path):
    from tune_kd import analysis
    from tune_kd.analysis.plots import drawings, figures

    experiment = analysis.load_experiment(reuse_experiment(tmp_path / "reuse-sweep"))
    ratios = dict(zip(experiment.trials["method"], experiment.trials["pruning_ratio"]))
    assert ratios == {"student": 83.40, "kd": 83.40, "simkd": 80.52, "reuse": 19.15}
    summary = analysis.summarize(experiment.trials)
    assert "pruning_ratio" in summary.columns
    reuse = summary[summary["method"].eq("reuse")].iloc[0]
    assert reuse["published_mean"] == 78.47  # SimKD+, configuration inferred (its note says so)
    assert "inferred" in reuse["published_note"]
    figure = figures(experiment)["accuracy_vs_pruning_ratio"]
    [ax] = figure.axes
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert [line.get_xdata()[0] for line in dashed] == [83.40]  # KD's ratio
    # Experiments without reuse trials: no ratio, no such plot.
    assert "accuracy_vs_pruning_ratio" not in drawings(
        experiment.__class__(
            experiment.location,
            experiment.plan,
            experiment.trials.drop(columns="pruning_ratio"),
            experiment.epochs,
            [],
        )
    )


def test_the_dry_run_prints_each_configurations_pruning_ratio(tmp_path, capsys):
    space = Path(__file__).parents[1] / "search_spaces" / "paper_reuse.yaml"
    assert run.main(["--dry-run", "--space", str(space), "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    notes = out[out.index("deployed parameters per configuration:") :].splitlines()[1:10]
    assert notes[0].startswith("  method=student student=resnet8x4:")
    ratios = [float(line.rsplit("pruning ratio ", 1)[1].rstrip(" %")) for line in notes]
    assert ratios[:3] == [83.40, 83.40, 80.52]  # student, KD, SimKD: the paper's Table S.10
    assert 19.15 in ratios and min(ratios) < 15.97 < max(r for r in ratios if r < 80)
