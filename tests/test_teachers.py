"""Teachers (tune_kd.teachers): the ones a space needs, their cache, and training the missing
ones, with a stand-in for Ray Tune (the sweep itself: tests/test_run.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from tune_kd import models, space, teachers
from tune_kd.storage import Storage

SPACES = Path(__file__).parents[1] / "search_spaces"


class FakeTraining:
    """Stands in for Tune: every recipe it trains ends with `weights` (None: it failed)."""

    def __init__(self, weights: bytes | None):
        self.weights = weights
        self.calls: list[tuple[str, list]] = []

    def __call__(self, experiment: str, recipes: list) -> list[bytes | None]:
        self.calls.append((experiment, recipes))
        return [self.weights for _ in recipes]


def test_trials_sharing_a_teacher_share_one_need_and_read_it_from_the_cache(tmp_path):
    loaded = space.load(SPACES / "paper_table1.yaml")
    storage = Storage(str(tmp_path))
    cached = loaded.with_teacher_checkpoints(teachers.cached_checkpoints(loaded.teachers, storage))
    by_key = {need.key: need for need in loaded.teachers}
    assert len(by_key) == len(loaded.teachers) == 3
    for before, after in zip(loaded.trials, cached.trials):
        if before.config.method == "student":
            assert before.teacher_key is None and after.config.teacher_checkpoint is None
            continue
        need = by_key[before.teacher_key]
        assert need.arch == before.config.teacher and before.config.teacher_checkpoint is None
        assert after.config.teacher_checkpoint == storage.uri_of(*teachers.cache_parts(need))
    recipe = loaded.teachers[0].recipe
    assert teachers.cache_parts(loaded.teachers[0]) == (
        "teachers",
        f"{loaded.teachers[0].arch}_vanilla-{teachers.recipe_hash(recipe)}",
        f"ckpt_epoch_{recipe.epochs}.pth",
    )


def test_a_file_teacher_is_checked_once_and_set_on_every_trial(tmp_path, teacher_checkpoint):
    text = yaml.safe_dump(
        {
            "dataset": "synthetic",
            "teacher": "resnet14",
            "student": "resnet8",
            "method": "kd",
            "teacher_checkpoints": {"resnet14": str(teacher_checkpoint)},
            "grid": {"seed": [0, 1]},
        }
    )
    loaded = space.load_text(text, tmp_path / "space.yaml")
    [need] = loaded.teachers
    assert need.checkpoint == need.key == str(teacher_checkpoint) and need.recipe is None
    assert {t.config.teacher_checkpoint for t in loaded.trials} == {str(teacher_checkpoint)}
    assert teachers.cached_checkpoints(loaded.teachers, Storage(str(tmp_path))) == {}


def test_missing_teachers_are_trained_once_and_cached_with_their_recipe(
    tmp_path, teacher_checkpoint
):
    loaded = space.load(SPACES / "quickstart.yaml")
    storage = Storage(str(tmp_path))
    [need] = loaded.teachers
    train = FakeTraining(teacher_checkpoint.read_bytes())
    teachers.train_missing(loaded.teachers, storage, train)
    [(experiment, recipes)] = train.calls
    assert experiment.startswith("teachers-") and recipes == [need.recipe]
    parts = teachers.cache_parts(need)
    assert storage.read(*parts) == teacher_checkpoint.read_bytes()
    assert yaml.safe_load(storage.read(*parts[:2], "config.yaml")) == need.recipe.to_dict()
    teachers.train_missing(loaded.teachers, storage, train)
    assert len(train.calls) == 1  # cached: not trained again
    states = teachers.load_states(loaded.teachers, storage)
    trained = models.load_checkpoint(teacher_checkpoint, "resnet14").state_dict()
    [state] = states.values()
    assert list(states) == [storage.uri_of(*parts)]
    assert all(np.array_equal(state[k], v.numpy()) for k, v in trained.items())


def test_a_teacher_that_fails_to_train_names_its_experiment_and_caches_nothing(tmp_path):
    loaded = space.load(SPACES / "quickstart.yaml")
    storage = Storage(str(tmp_path))
    with pytest.raises(RuntimeError, match="training teacher resnet14 failed: see ") as raised:
        teachers.train_missing(loaded.teachers, storage, FakeTraining(None))
    assert str(tmp_path / "teachers-") in str(raised.value)
    assert not storage.exists(*teachers.cache_parts(loaded.teachers[0]))


def test_finished_cross_entropy_runs_fill_the_cache_without_replacing_it(tmp_path):
    ce = space.load(SPACES / "teachers.yaml").trials[0].config
    distilling = space.load(SPACES / "quickstart.yaml").trials[0].config
    storage = Storage(str(tmp_path))
    teachers.cache_finished([ce, distilling], [b"first", b"kd"], storage)
    parts = teachers.cache_parts(teachers.TeacherNeed(ce.student, recipe=ce))
    assert storage.read(*parts) == b"first"
    assert [f.name for f in (tmp_path / "teachers").iterdir()] == [parts[1]]
    teachers.cache_finished([ce], [b"second"], storage)
    assert storage.read(*parts) == b"first"
