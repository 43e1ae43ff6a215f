"""One training run without Ray: the recipe, the metrics, divergence, checkpoints and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tune_kd import space as space_module
from tune_kd import teachers, train
from tune_kd.config import Config, ConfigError, resolve
from tune_kd.storage import Storage
from tune_kd.train import TIMING_METRICS, Run

METRICS = {
    "epoch",
    "lr",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "test_acc_top5",
    "best_test_acc",
    "dropped_samples",
    "epoch_seconds",
    "images_per_second",
    "diverged",
    "teacher_test_acc",
}


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_METRICS} for row in rows]


def train_all(run: Run) -> list[dict]:
    rows = []
    train.fit(run, report=lambda metrics: rows.append(metrics[0]))
    return rows


def test_paper_recipe_is_the_default():
    config = resolve(Config(teacher="resnet32x4", student="resnet8x4", device="cpu"))
    assert (config.epochs, config.batch_size, config.lr) == (240, 64, 0.05)
    assert (config.momentum, config.weight_decay, config.lr_decay_epochs) == (
        0.9,
        5e-4,
        [150, 180, 210],
    )
    assert (config.ce_weight, config.kd_weight, config.feat_weight) == (0.0, 0.0, 1.0)
    for student in ("MobileNetV2", "MobileNetV2_1_0", "ShuffleV1", "ShuffleV2", "ShuffleV2_1_5"):
        assert resolve(Config(teacher="resnet32x4", student=student, device="cpu")).lr == 0.01
    assert resolve(Config(method="kd", teacher="resnet32x4", device="cpu")).ce_weight == 1.0


def test_learning_rate_drops_tenfold_after_each_decay_epoch():
    config = resolve(Config(teacher="resnet32x4", device="cpu"))
    lrs = [train.learning_rate(config, e) for e in (1, 150, 151, 180, 181, 210, 211, 240)]
    assert lrs == pytest.approx([0.05, 0.05, 0.005, 0.005, 0.0005, 0.0005, 0.00005, 0.00005])


@pytest.mark.parametrize(
    ("values", "key", "message"),
    [
        ({"weight_decy": 0.1}, "weight_decy", "did you mean weight_decay"),
        ({"lr": -0.1}, "lr", "> 0"),
        ({"lr": "fast"}, "lr", "expected a number"),
        ({"epochs": 2.5}, "epochs", "integer"),
        ({"student": "resnet8x5"}, "student", "did you mean resnet8x4"),
        ({"loss": "huber"}, "loss", "one of l2, cosine, kl"),
        ({"method": "kd"}, "teacher", "needs a teacher"),
        (
            {"method": "student", "teacher_correct_only": True},
            "teacher_correct_only",
            "needs method kd, simkd",
        ),
        (
            {"teacher": "resnet8", "projector": "multi", "projector_weights": [1]},
            "projector_weights",
            "takes 2",
        ),
    ],
)
def test_bad_values_name_their_key(values, key, message):
    with pytest.raises(ConfigError, match=message) as error:
        Config.from_dict(values)
    assert error.value.key == key


def test_yaml_style_numbers_are_accepted_for_float_keys():
    assert Config.from_dict({"weight_decay": "5e-4", "teacher": "resnet8"}).weight_decay == 5e-4


def test_a_short_synthetic_run_beats_chance():
    config = {
        "dataset": "synthetic",
        "synthetic_train_size": 1000,
        "synthetic_test_size": 200,
        "method": "student",
        "student": "resnet8",
        "epochs": 5,
        "lr_decay_epochs": [4],
        "device": "cpu",
    }
    rows = train_all(Run([config]))
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert set(rows[-1]) == METRICS
    assert rows[-1]["best_test_acc"] > 30  # 10 classes: chance is 10 %
    assert rows[-1]["best_test_acc"] == max(r["test_acc"] for r in rows)
    assert rows[-1]["lr"] == pytest.approx(0.005)


def test_resume_reports_exactly_what_an_uninterrupted_run_reports(tiny, tmp_path):
    config = {**tiny, "epochs": 3, "teacher_correct_only": True, "projector": "multi"}
    uninterrupted = train_all(Run([config]))
    first = Run([config])
    head = [first.train_epoch()[0]]
    first.save(tmp_path / "run.pt")
    second = Run([config])
    second.load(tmp_path / "run.pt")
    assert second.epoch == 1
    resumed = head + train_all(second)
    assert without_timing(resumed) == without_timing(uninterrupted)


def test_a_checkpoint_of_another_configuration_is_refused(tiny, tmp_path):
    run = Run([tiny])
    run.save(tmp_path / "run.pt")
    other = Run([{**tiny, "lr": 0.2}])
    with pytest.raises(ValueError, match="another configuration"):
        other.load(tmp_path / "run.pt")


def test_a_diverging_run_stops_with_its_last_metrics():
    config = {
        "dataset": "synthetic",
        "synthetic_train_size": 96,
        "synthetic_test_size": 64,
        "method": "student",
        "student": "resnet8",
        "batch_size": 32,
        "epochs": 3,
        "lr_decay_epochs": [],
        "lr": 1e6,
        "device": "cpu",
    }
    rows = train_all(Run([config]))
    assert len(rows) == 1 and rows[0]["diverged"] is True
    assert rows[0]["epoch"] == 1


def test_the_teacher_must_fit_the_dataset(tiny):
    with pytest.raises(ConfigError, match="10 classes but synthetic has 7"):
        Run([{**tiny, "synthetic_classes": 7}])


# ----------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    "keys",
    [
        ["--method", "student"],
        ["--method", "kd"],
        *(
            ["--loss", loss, "--projector", placement]
            for loss in ("l2", "cosine", "kl")
            for placement in ("single", "multi", "all")
        ),
    ],
)
def test_every_method_loss_and_placement_runs_from_the_command_line(tiny, tmp_path, capsys, keys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**tiny, "epochs": 1}))
    out = tmp_path / "run"
    assert train.main(["--config", str(config), "--out", str(out), *keys]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["epoch", "lr", "train_loss"]
    assert lines[2].split()[0] == "1"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved[keys[0][2:]] == keys[1] and saved["lr"] == 0.05 and saved["device"] == "cpu"
    [row] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(row) == METRICS
    student = torch.load(out / "student.pth", weights_only=True)
    assert set(student) == {"model", "epoch", "best_acc"} and student["epoch"] == 1


def test_the_command_line_resumes_a_run_folder(tiny, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**tiny, "epochs": 1}))
    out = tmp_path / "run"
    assert train.main(["--config", str(config), "--out", str(out)]) == 0
    assert (
        train.main(["--config", str(config), "--out", str(out), "--set", "epochs=2", "--resume"])
        == 0
    )
    epochs = [
        json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert epochs == [1, 2]


def test_a_space_file_of_one_trial_is_a_configuration(tiny, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({**tiny, "epochs": 1, "grid": {"loss": ["cosine"]}}))
    assert train.main(["--config", str(space), "--out", str(tmp_path / "run")]) == 0
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["loss"] == "cosine"
    space.write_text(yaml.safe_dump({**tiny, "grid": {"loss": ["l2", "kl"]}}))
    assert train.main(["--config", str(space)]) == 2
    assert "describes 2 trials, not one" in capsys.readouterr().err


def test_set_picks_one_trial_of_a_sweep_and_its_teacher_comes_from_the_sweeps_cache(
    tiny, tmp_path, capsys
):
    """A teacher the file trains first is trained once, where a sweep of the file caches it."""
    values = {k: v for k, v in tiny.items() if k != "teacher_checkpoint"}
    space = tmp_path / "space.yaml"
    recipe = {"epochs": 1, "lr_decay_epochs": [1], "batch_size": 32}
    space.write_text(
        yaml.safe_dump({**values, "teacher_train": recipe, "grid": {"lr": [0.05, 0.2]}})
    )
    storage = tmp_path / "results"
    argv = ["--config", str(space), "--set", "lr=0.2", "--storage", str(storage)]
    assert train.main([*argv, "--out", str(tmp_path / "first")]) == 0
    assert "training 1 teacher(s) first: resnet14" in capsys.readouterr().out
    [need] = space_module.load(space).teachers
    cached = Storage(str(storage)).uri_of(*teachers.cache_parts(need))
    assert Path(cached).is_file()
    saved = yaml.safe_load((tmp_path / "first" / "config.yaml").read_text())
    assert saved["teacher_checkpoint"] == cached and saved["lr"] == 0.2
    assert train.main([*argv, "--out", str(tmp_path / "second")]) == 0
    assert "teacher(s) first" not in capsys.readouterr().out


def test_a_teacher_to_train_first_needs_a_writable_storage(tiny, tmp_path, capsys):
    values = {k: v for k, v in tiny.items() if k != "teacher_checkpoint"}
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump({**values, "teacher_train": {"epochs": 1, "lr_decay_epochs": [1]}})
    )
    (tmp_path / "file").write_text("")
    out = tmp_path / "run"
    argv = ["--config", str(space), "--storage", str(tmp_path / "file"), "--out", str(out)]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "key '--storage'" in err and "is a file" in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "-1"], "key 'lr': expected a value > 0"),
        (["--set", "studnet=resnet8"], "key 'studnet': unknown key; did you mean student"),
        (["--teacher-checkpoint", "/nowhere/resnet14_vanilla/ckpt.pth"], "/nowhere"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny, tmp_path, capsys, args, message):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny))
    out = tmp_path / "run"
    assert train.main(["--config", str(config), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def train_members(run: Run) -> list[list[dict]]:
    """Every student's rows: a student that stopped reports no more."""
    rows: list[list[dict]] = [[] for _ in run.members]
    train.fit(run, report=lambda metrics: [r.append(m) for r, m in zip(rows, metrics) if m])
    return [without_timing(r) for r in rows]


def test_a_student_trained_in_a_group_reports_what_it_reports_alone(tiny):
    """One after another, exactly (fused students: tests/test_fused.py)."""
    sequential = {**tiny, "epochs": 3, "fuse_students": False}
    cells = [
        {**sequential, "loss": "l2", "lr": 0.05},
        {**sequential, "loss": "kl", "lr": 0.02, "projector": "multi"},
        {**sequential, "loss": "cosine", "lr": 1e6},  # diverges in the first epoch
    ]
    grouped = train_members(Run(cells))
    assert grouped[1] == train_members(Run([cells[1]]))[0]
    assert grouped[0] == train_members(Run([cells[0]]))[0]
    assert [r["diverged"] for r in grouped[2]] == [True]  # it stopped alone
    assert len(grouped[0]) == len(grouped[1]) == 3


def test_a_group_resumes_as_a_whole(tiny, tmp_path):
    cells = [{**tiny, "epochs": 3, "lr": lr} for lr in (0.01, 0.05)]
    uninterrupted = train_members(Run(cells))
    first = Run(cells)
    head = first.train_epoch()
    first.save(tmp_path / "group.pt")
    second = Run(cells)
    second.load(tmp_path / "group.pt")
    tail = train_members(second)
    assert [[without_timing([h])[0], *t] for h, t in zip(head, tail)] == uninterrupted


def test_students_of_a_group_must_share_the_batches(tiny):
    with pytest.raises(ConfigError, match="key 'seed': students trained in one group"):
        Run([tiny, {**tiny, "seed": 1}])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_steps_replayed_as_cuda_graphs_train_as_eager_steps(tiny):
    config = {
        **tiny,
        "device": "cuda",
        "precision": "fp32",
        "epochs": 3,
        "projector": "multi",
        "synthetic_train_size": 200,
    }  # a partial last batch runs eagerly
    eager = without_timing(train_all(Run([{**config, "cuda_graphs": False}])))
    assert Run([config]).shared.cuda_graphs  # the default on CUDA
    graphed = without_timing(train_all(Run([config])))
    for a, b in zip(eager, graphed):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-4)
