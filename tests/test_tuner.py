"""The sweep as Ray Tune sees it (tune_kd.tuner): the trials Tune creates from a space, their
names and folders, and the progress table, built without starting Ray."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import ray.tune.utils.log
from ray.tune.experiment import Trial
from ray.tune.search.variant_generator import generate_variants

from tune_kd import plan, space, tuner

SPACES = Path(__file__).parents[1] / "search_spaces"


@pytest.fixture(autouse=True)
def tune_as_the_sweep_runs(monkeypatch):
    """Tune's verbosity as the sweep sets it (`verbose=1`), and trials without a storage."""
    monkeypatch.setattr(ray.tune.utils.log, "verbosity", ray.tune.utils.log.Verbosity(1))
    monkeypatch.setattr(Trial, "local_experiment_path", property(lambda self: "experiment"))
    monkeypatch.setattr(Trial, "local_path", property(lambda self: None))


def tune_trials(loaded: space.Space) -> list[Trial]:
    """The trials Tune creates from the space's param space and TuneConfig, each running and
    past its first epoch with a test accuracy of 10 plus its number."""
    config = tuner.tune_config(loaded, max_concurrent=None)
    trials = []
    for number, (_, params) in enumerate(generate_variants(tuner.param_space(loaded))):
        trial = Trial(
            "train_trial",
            config=params,
            stub=True,
            trial_name_creator=config.trial_name_creator,
            trial_dirname_creator=config.trial_dirname_creator,
        )
        trial.set_status(Trial.RUNNING)
        accuracy = 10.0 + number
        result = {"epoch": 1, "test_acc": accuracy, "best_test_acc": accuracy, "diverged": False}
        trial.update_last_result({**result, "config": params})
        trials.append(trial)
    return trials


def progress_table(loaded: space.Space, trials: list[Trial], capsys) -> list[dict[str, str]]:
    """The rows of the progress table the sweep's reporter prints for `trials`, by heading."""
    config = tuner.tune_config(loaded, max_concurrent=None)
    reporter = tuner.progress_reporter(loaded, "results/experiment")
    reporter.setup(start_time=time.time(), metric=config.metric, mode=config.mode)
    capsys.readouterr()
    reporter.report(trials, done=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    header, *rows = ([cell.strip() for cell in line.strip("|").split("|")] for line in lines)
    return [dict(zip(header, row)) for row in rows]


def test_the_table_names_the_best_trial_as_its_rows_and_the_experiment_by_its_storage(capsys):
    """Tune's own lines name the best trial by Tune's id and the folder by Tune's copy of it."""
    loaded = space.load(SPACES / "quickstart.yaml")
    trials = tune_trials(loaded)
    config = tuner.tune_config(loaded, max_concurrent=None)
    reporter = tuner.progress_reporter(loaded, "s3://bucket/results/quick")
    reporter.setup(start_time=time.time(), metric=config.metric, mode=config.mode)
    reporter.report(trials, done=True)
    out = capsys.readouterr().out
    best = str(trials[-1])  # the highest accuracy: 10 plus the trial's number
    assert f"Current best trial: {best} with best_test_acc=" in out
    assert trials[-1].trial_id not in out
    assert "Result logdir: s3://bucket/results/quick\n" in out and "experiment" not in out


def headings(rows: list[dict[str, str]]) -> list[str]:
    """The table's columns after Tune's own (name, status, location)."""
    return list(rows[0])[3:]


def test_a_grid_shows_each_trial_by_plan_index_with_its_axes(capsys):
    loaded = space.load(SPACES / "quickstart.yaml")
    trials = tune_trials(loaded)
    names = [str(t) for t in trials]
    assert names == [plan.trial_folder_name(t.index, grouped=False) for t in loaded.trials]
    assert all(t.custom_dirname == str(t) for t in trials)  # the folder has the trial's name
    rows = progress_table(loaded, trials, capsys)
    assert headings(rows) == ["loss", "lr", "seed", "epoch", "acc", "best", "diverged"]
    assert sorted(row["Trial name"] for row in rows) == sorted(names)
    for row in rows:
        position = int(plan.TRIAL_FOLDER.fullmatch(row["Trial name"])[1])
        axes = loaded.trials[position].axes
        assert (row["loss"], float(row["lr"]), int(row["seed"])) == (
            axes["loss"],
            axes["lr"],
            axes["seed"],
        )


def test_a_group_shows_its_size_and_only_the_axes_its_students_share(capsys):
    """Groups of six students (3 losses x 2 lrs) per seed: only `seed` is one value per group."""
    loaded = space.load(SPACES / "quickstart.yaml", {"group_students": True})
    trials = tune_trials(loaded)
    assert [str(t) for t in trials] == ["group_0000", "group_0001"]
    assert all(t.custom_dirname == str(t) for t in trials)
    rows = progress_table(loaded, trials, capsys)
    assert headings(rows) == ["students", "seed", "epoch", "acc", "best", "diverged"]
    for row in rows:
        group = loaded.groups[int(plan.TRIAL_FOLDER.fullmatch(row["Trial name"])[1])]
        assert int(row["students"]) == len(group) == 6
        assert {int(row["seed"])} == {t.axes["seed"] for t in group}


def test_a_group_of_several_teachers_shows_its_extra_teachers(capsys):
    """paper_table6.yaml's groups each share a list of extra teachers (a value that cannot be
    hashed): a column like any other, holding the group's list."""
    loaded = space.load(SPACES / "paper_table6.yaml", {"seed": [0]})
    trials = tune_trials(loaded)
    rows = progress_table(loaded, trials, capsys)
    assert headings(rows)[:4] == ["students", "teacher", "extra_teachers", "seed"]
    assert len(rows) == len(loaded.groups) == 3
    for trial in trials:
        group = loaded.groups[int(plan.TRIAL_FOLDER.fullmatch(str(trial))[1])]
        assert all(t.axes.get("extra_teachers") == trial.config["extra_teachers"] for t in group)


def test_an_optuna_trial_is_named_by_its_id_and_shows_the_sampled_values(capsys):
    loaded = space.load(SPACES / "optuna_lr_wd.yaml")
    [trial] = tune_trials(loaded)
    assert str(trial) == trial.custom_dirname == plan.sampled_folder_name(trial.trial_id)
    [row] = progress_table(loaded, [trial], capsys)
    assert headings([row]) == [*loaded.search.ranges, "epoch", "acc", "best", "diverged"]
    assert float(row["lr"]) == pytest.approx(trial.config["lr"], rel=1e-5)


def test_the_reporter_leaves_the_environment_alone_and_tunes_table_is_chosen_apart(monkeypatch):
    from ray.tune.experimental.output import get_air_verbosity

    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")  # Tune's default: its per-trial output
    tuner.progress_reporter(space.load(SPACES / "quickstart.yaml"), "results/experiment")
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1"
    assert get_air_verbosity(1) is not None
    tuner.use_table_output()
    assert get_air_verbosity(1) is None  # Tune reads it: the old engine, with the reporter
