"""Distillation from several teachers (the paper's Table 6): SimKD with one projector per teacher,
AVEG, the teachers of a run and of a space file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import save_checkpoint
from test_fused import assert_same_metrics, fused_steps, train_members  # noqa: F401

from tune_kd import analysis, distillers, losses, models, run, space, teachers, train
from tune_kd.config import Config, resolve

SHIPPED = Path(__file__).parents[1] / "search_spaces"


def teacher_of(arch: str, seed: int) -> distillers.Teacher:
    torch.manual_seed(seed)
    return distillers.Teacher(models.create(arch, 10))


def build(method: str, teachers: list[distillers.Teacher], **keys) -> distillers.Distiller:
    torch.manual_seed(0)
    config = resolve(
        Config(teacher="resnet14", student="resnet8", method=method, device="cpu", **keys)
    )
    return distillers.create(config, models.create("resnet8", 10), teachers)


def batch() -> distillers.Batch:
    torch.manual_seed(1)
    return distillers.Batch(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)), torch.arange(8))


def outputs(distiller, teachers, data: distillers.Batch) -> list[distillers.TeacherOutput]:
    return [t(data.images, data.labels, set(distiller.teacher_features)) for t in teachers]


def test_simkd_of_one_teacher_is_the_papers_simkd():
    """One teacher: one projector to its last map, the mean per-sample L2 loss, and the teacher's
    classifier on the pooled projection, under the state_dict names of single-teacher SimKD."""
    teacher = teacher_of("resnet14", 1)
    distiller = build("simkd", [teacher])
    keys = {k.split(".")[0] for k in distiller.state_dict()}
    assert keys == {"student", "projectors"}
    assert {k.split(".")[1] for k in distiller.state_dict() if k.startswith("projectors")} == {"0"}
    data = batch()
    [out] = outputs(distiller, [teacher], data)
    step = distiller.train_step(data, [out])
    features, _ = distiller.student(data.images, is_feat=True)
    projected, target, logits = distiller.projectors[0](
        features[-2], out.features[3], teacher.classifier
    )
    assert torch.equal(step.loss, losses.l2(projected, target).mean())
    assert torch.equal(step.logits, logits)
    distiller.eval()
    with torch.no_grad():
        features, _ = distiller.student(data.images, is_feat=True)
        _, _, expected = distiller.projectors[0](features[-2], out.features[3], teacher.classifier)
        assert torch.equal(distiller.predict(data.images), expected)


def test_simkd_of_two_copies_of_one_teacher_sums_their_losses_and_averages_their_logits():
    teacher = teacher_of("resnet14", 1)
    single = build("simkd", [teacher])
    double = build("simkd", [teacher, teacher], extra_teachers=["resnet14"])
    assert len(double.projectors) == 2
    double.projectors[1].load_state_dict(single.projectors[0].state_dict())
    double.student.load_state_dict(single.student.state_dict())
    double.projectors[0].load_state_dict(single.projectors[0].state_dict())
    data = batch()
    one = single.train_step(data, outputs(single, [teacher], data))
    two = double.train_step(data, outputs(double, [teacher, teacher], data))
    assert torch.allclose(two.loss, 2 * one.loss, rtol=1e-6)
    assert torch.allclose(two.logits, one.logits, atol=1e-6)


def test_simkd_projects_to_teachers_of_different_widths_and_predicts_by_their_mean():
    teachers = [teacher_of("resnet14", 1), teacher_of("resnet8x4", 2)]
    distiller = build("simkd", teachers, extra_teachers=["resnet8x4"])
    widths = [p.transfer[-3].out_channels for p in distiller.projectors]
    assert widths == [t.stages[-1].channels for t in teachers] and widths[0] != widths[1]
    data = batch()
    outs = outputs(distiller, teachers, data)
    step = distiller.train_step(data, outs)
    step.loss.backward()
    assert all(p.grad is not None for p in distiller.projectors.parameters())
    features, _ = distiller.student(data.images, is_feat=True)
    parts = [
        projector(features[-2], out.features[len(t.stages)], t.classifier)
        for projector, out, t in zip(distiller.projectors, outs, teachers)
    ]
    expected_loss = sum(losses.l2(p, target).mean() for p, target, _ in parts)
    assert torch.allclose(step.loss, expected_loss, rtol=1e-6)
    assert torch.allclose(step.logits, (parts[0][2] + parts[1][2]) / 2, atol=1e-6)


def test_simkd_with_several_teachers_takes_one_projector_each():
    teachers = [teacher_of("resnet14", 1), teacher_of("resnet14", 2)]
    with pytest.raises(ValueError, match="projector single"):
        build("simkd", teachers, extra_teachers=["resnet14"], projector="multi")


def test_aveg_of_one_teacher_is_kd():
    teacher = teacher_of("resnet14", 1)
    aveg, kd = build("aveg", [teacher]), build("kd", [teacher])
    data = batch()
    out = outputs(kd, [teacher], data)
    assert torch.equal(aveg.train_step(data, out).loss, kd.train_step(data, out).loss)


def test_aveg_averages_the_teachers_kl_terms():
    teachers = [teacher_of("resnet14", 1), teacher_of("resnet14", 2)]
    distiller = build("aveg", teachers, extra_teachers=["resnet14"])
    data = batch()
    outs = outputs(distiller, teachers, data)
    logits = distiller.student(data.images)
    kl = [losses.kl_divergence(logits, o.logits, 4).mean() for o in outs]
    expected = F.cross_entropy(logits, data.labels) + (kl[0] + kl[1]) / 2
    assert torch.allclose(distiller.train_step(data, outs).loss, expected, rtol=1e-6)


def test_only_multi_teacher_methods_take_extra_teachers():
    with pytest.raises(ValueError, match="extra_teachers"):
        space.load_text(
            yaml.safe_dump({"teacher": "resnet14", "extra_teachers": ["resnet14"], "method": "kd"}),
            "kd.yaml",
        )


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory) -> list[Path]:
    """Untrained resnet14 and resnet8x4 (final widths 64 and 256) with 10 classes."""
    folder = tmp_path_factory.mktemp("teachers")
    paths = []
    for seed, arch in enumerate(("resnet14", "resnet8x4")):
        torch.manual_seed(seed)
        model = models.create(arch, 10)
        paths.append(save_checkpoint(model, folder / f"{arch}_vanilla" / "ckpt_epoch_240.pth"))
    return paths


def tiny_multi(paths: list[Path], **keys) -> dict:
    return {
        "dataset": "synthetic",
        "synthetic_train_size": 64,
        "synthetic_test_size": 32,
        "teacher": "resnet14",
        "teacher_checkpoint": str(paths[0]),
        "extra_teachers": ["resnet8x4"],
        "extra_teacher_checkpoints": [str(paths[1])],
        "student": "resnet8",
        "batch_size": 32,
        "epochs": 1,
        "lr_decay_epochs": [1],
        "device": "cpu",
        **keys,
    }


def test_a_group_runs_each_teacher_once_per_batch_for_all_its_students(two_teachers, monkeypatch):
    configs = [tiny_multi(two_teachers, method=m) for m in ("simkd", "aveg", "simkd")]
    configs[2]["lr"] = 0.01
    trained = train.Run(configs)
    assert [m.distiller.teacher_count for m in trained.members] == [2, 2, 2]
    widths = [t.stages[-1].channels for t in trained.teachers]
    assert widths == [64, 256]
    calls = {id(t): 0 for t in trained.teachers}
    original = distillers.Teacher.__call__

    def counted(self, *args):
        calls[id(self)] += 1
        return original(self, *args)

    monkeypatch.setattr(distillers.Teacher, "__call__", counted)
    trained.train_epoch()
    assert list(calls.values()) == [2, 2]  # 64 images, batches of 32
    assert all(not m.diverged for m in trained.members)


@pytest.mark.parametrize("method", ["aveg", "simkd"])
def test_a_fused_student_of_two_teachers_reports_what_it_reports_alone(
    method,
    two_teachers,
    fused_steps,  # noqa: F811
):
    configs = [
        tiny_multi(two_teachers, method=method, epochs=1, fuse_students=True),
        tiny_multi(two_teachers, method=method, epochs=1, fuse_students=True, lr=0.02),
    ]
    grouped = train.Run(configs)
    assert [m.distiller.teacher_count for m in grouped.members] == [2, 2]
    rows = train_members(grouped)
    assert fused_steps and max(fused_steps) == 2  # both students in each step
    for config, got in zip(configs, rows):
        assert_same_metrics(got, train_members(train.Run([config]))[0])


def test_the_command_line_trains_from_two_teachers(two_teachers, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    values = tiny_multi(two_teachers, method="simkd", epochs=2)
    config.write_text(yaml.safe_dump(values))
    out = tmp_path / "run"
    assert train.main(["--config", str(config), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["extra_teacher_checkpoints"] == [str(two_teachers[1])]


def test_the_table6_dry_run_lists_every_teacher_trained_first(tmp_path, capsys):
    path = SHIPPED / "paper_table6.yaml"
    storage = tmp_path / "results"
    assert run.main(["--dry-run", "--space", str(path), "--storage", str(storage)]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [line for line in lines if line.startswith("teacher ")]
    assert sorted(line.split(":")[0] for line in listed) == [
        "teacher resnet110x2",
        *["teacher resnet32x4"] * 3,
    ]
    seeds = sorted(line.split("seed ")[1] for line in listed if "resnet32x4" in line)
    assert seeds == ["0)", "1)", "2)"]
    loaded = space.load(path)
    for trial in loaded.trials:
        keys = [trial.teacher_key, *trial.extra_teacher_keys]
        assert len(set(keys)) == len(keys)  # three ResNet-32x4, three networks
    for group in loaded.groups:
        assert len({(t.teacher_key, t.extra_teacher_keys) for t in group}) == 1


def test_teachers_yaml_trains_every_teacher_of_table6():
    trained = space.load(SHIPPED / "teachers.yaml").trials
    needed = space.load(SHIPPED / "paper_table6.yaml").teachers
    assert len(needed) == 4
    assert {teachers.recipe_hash(n.recipe) for n in needed} <= {
        teachers.recipe_hash(t.config) for t in trained
    }


def test_a_table6_number_matches_only_a_cell_of_its_teachers():
    rows = analysis.published_numbers().to_dict("records")
    cell = {"teacher": "resnet32x4", "student": "ShuffleV2", "method": "simkd", "loss": "l2"}
    group2 = analysis.most_specific(
        cell | {"extra_teachers": "['resnet32x4', 'resnet110x2']"}, rows
    )
    assert (group2["table"], group2["mean"], group2["std"]) == ("Table 6", 78.59, 0.05)
    assert analysis.most_specific(cell, rows)["table"] == "Table 1"
    aveg = cell | {"method": "aveg", "extra_teachers": "['resnet32x4', 'resnet32x4']"}
    assert analysis.most_specific(aveg, rows)["mean"] == 75.94
