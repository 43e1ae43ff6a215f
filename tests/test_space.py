"""Search-space files: expansion into trials, validation with one clear line, and dry runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tune_kd import models, run, space
from tune_kd.space import SpaceError

SHIPPED = Path(__file__).parents[1] / "search_spaces"

# The trial counts the study's slides and the paper's tables call for.
EXPECTED_TRIALS = {
    "quickstart.yaml": 12,
    "study_losses.yaml": 45,  # loss 3 x lr 5 x 3 seeds
    "study_multi_projector.yaml": 18,  # loss 2 x lr 3 x 3 seeds
    "study_all_projectors.yaml": 18,
    "study_teacher_correct.yaml": 18,
    "paper_table1.yaml": 80,  # 7 pairs x (kd, simkd) x 4 seeds + 6 students x 4 seeds
    "paper_table2.yaml": 84,  # 7 pairs x (kd, simkd) x 4 seeds + 7 students x 4 seeds
    "paper_projectors.yaml": 28,  # 4 designs x 4 seeds + r in {1, 4, 8} x 4 seeds
    "teachers.yaml": 3,
    "optuna_lr_wd.yaml": 24,
}


def test_every_shipped_file_is_listed_here():
    assert sorted(p.name for p in SHIPPED.glob("*.yaml")) == sorted(EXPECTED_TRIALS)


@pytest.mark.parametrize("name", sorted(EXPECTED_TRIALS))
def test_dry_run_of_each_shipped_file(name, tmp_path, capsys):
    storage = tmp_path / "results"
    assert run.main(["--dry-run", "--space", str(SHIPPED / name), "--storage", str(storage)]) == 0
    out = capsys.readouterr().out
    assert f"\n{EXPECTED_TRIALS[name]} trials" in out
    assert "GPU-hours" in out and "resources per trial" in out
    assert not storage.exists()


def test_the_study_grid_crosses_loss_lr_and_seed():
    loaded = space.load(SHIPPED / "study_losses.yaml")
    assert loaded.axes == ["loss", "lr", "seed"]
    assert loaded.trials[0].axes == {"loss": "l2", "lr": 0.001, "seed": 0}
    assert loaded.trials[1].axes == {"loss": "l2", "lr": 0.001, "seed": 1}
    assert loaded.trials[-1].axes == {"loss": "kl", "lr": 0.1, "seed": 2}
    assert {t.config.teacher for t in loaded.trials} == {"resnet38x2"}
    assert [t.index for t in loaded.trials] == list(range(45))


def test_bundles_and_unions_label_trials_by_plain_keys():
    loaded = space.load(SHIPPED / "paper_table1.yaml")
    first = loaded.trials[0]
    assert first.axes == {"teacher": "resnet38x2", "student": "resnet38", "method": "kd", "seed": 0}
    baseline = next(t for t in loaded.trials if t.config.method == "student")
    assert baseline.labels["teacher"] is None and baseline.labels["loss"] is None
    assert {n.arch for n in loaded.teachers} == {"resnet38x2", "resnet32x4", "resnet110x2"}


def test_overrides_replace_an_axis_or_set_a_key():
    loaded = space.load(SHIPPED / "study_losses.yaml", {"lr": [0.05], "epochs": 3, "seed": 0})
    assert len(loaded.trials) == 3
    assert {t.config.lr for t in loaded.trials} == {0.05}
    assert {t.config.epochs for t in loaded.trials} == {3}


def test_teachers_yaml_fills_the_cache_the_study_files_read():
    """A teacher trained by teachers.yaml has the recipe hash an on-demand teacher looks for."""
    trained = space.load(SHIPPED / "teachers.yaml").trials
    needed = space.load(SHIPPED / "study_losses.yaml").teachers
    [need] = needed
    [same] = [t for t in trained if t.config.student == need.arch]
    assert space.recipe_hash(same.config) == space.recipe_hash(need.recipe)
    other = space.load(SHIPPED / "teachers.yaml", {"seed": 1}).trials[0]
    assert space.recipe_hash(other.config) != space.recipe_hash(need.recipe)


def test_optuna_samples_its_ranges():
    loaded = space.load(SHIPPED / "optuna_lr_wd.yaml")
    assert loaded.search.algorithm == "optuna" and loaded.planned == 24
    assert loaded.search.ranges["lr"] == space.Range("loguniform", (0.001, 0.2))
    assert loaded.scheduler == space.Scheduler("asha", grace_period=155, reduction_factor=3.0)


# ----------------------------------------------------------------------------- bad files

BASE = {"name": "bad", "dataset": "synthetic", "method": "student", "student": "resnet8"}


@pytest.fixture
def mismatched(tmp_path) -> Path:
    """resnet8 weights in a folder that says resnet14."""
    path = tmp_path / "resnet14_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    torch.save({"model": models.create("resnet8", 10).state_dict()}, path)
    return path


BAD_FILES = [
    ({"lernrate": 0.1}, "lernrate", "unknown key"),
    ({"student": "resnet8x5"}, "student", "did you mean resnet8x4"),
    ({"grid": {"lr": [0.1, -1]}}, "grid.lr", "expected a value > 0"),
    ({"grid": {"loss": ["l2", "huber"]}}, "grid.loss", "one of l2, cosine, kl"),
    ({"grid": {"epochs": [2.5]}}, "grid.epochs", "integer"),
    ({"grid": {"lr": 0.1}}, "grid.lr", "non-empty list"),
    (
        {"grid": {"pair": [{"teacher": "resnet8", "studnt": "resnet8"}]}},
        "grid.pair.studnt",
        "did you mean student",
    ),
    ({"method": "simkd", "teacher": "resnet14"}, "teacher_checkpoints", "no checkpoint"),
    (
        {
            "method": "simkd",
            "teacher": "resnet14",
            "teacher_checkpoints": {"resnet14": "/nowhere/ckpt.pth"},
        },
        "teacher_checkpoints.resnet14",
        "/nowhere/ckpt.pth",
    ),
    (
        {
            "method": "simkd",
            "teacher": "resnet14",
            "teacher_checkpoints": {"resnet14": "MISMATCHED"},
        },
        "teacher_checkpoints.resnet14",
        "look like resnet8",
    ),
    ({"resources": {"gpus": 1}}, "resources.gpus", "unknown key"),
    ({"scheduler": {"name": "hyperband"}}, "scheduler.name", "one of fifo, asha"),
    (
        {"search": {"algorithm": "optuna", "space": {"lr": {"loguniform": [0, 1]}}}},
        "search.space.lr",
        "> 0",
    ),
    ({"group_students": True, "scheduler": "asha"}, "group_students", "scheduler fifo"),
]


@pytest.mark.parametrize(("keys", "key", "message"), BAD_FILES)
def test_bad_files_fail_in_one_line_naming_file_and_key(
    keys, key, message, tmp_path, mismatched, capsys
):
    if keys.get("teacher_checkpoints", {}).get("resnet14") == "MISMATCHED":
        keys = {**keys, "teacher_checkpoints": {"resnet14": str(mismatched)}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**BASE, **keys}))
    storage = tmp_path / "results"
    assert run.main(["--space", str(path), "--storage", str(storage)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: {path}: key '{key}'") and message in err
    assert not storage.exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [("name: [unclosed", "not valid YAML"), ("- a list", "mapping of keys")],
)
def test_unreadable_files_fail_in_one_line(text, message, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError, match=message):
        space.load(path)
    with pytest.raises(SpaceError, match="cannot read the file"):
        space.load(tmp_path / "missing.yaml")
