"""The sweep's contracts with its readers (tune_kd.plan): the plan file, the trial folders' names
and a group's per-student results, written as the sweep writes them and read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tune_kd import analysis, plan, space
from tune_kd.storage import Storage

QUICKSTART = Path(__file__).parents[1] / "search_spaces" / "quickstart.yaml"


def grouped_space() -> space.Space:
    """The quickstart's 12 trials, in two groups of six students (one per seed)."""
    return space.load(QUICKSTART, {"group_students": True, "epochs": 2, "lr_decay_epochs": [1]})


def test_the_plan_reads_back_as_written(tmp_path):
    loaded = grouped_space()
    storage = Storage(str(tmp_path))
    plan.write_plan(storage, "exp", loaded, "SPACE TEXT", {"epochs": 2}, space.Resources(2, 0.5))
    written = plan.read_plan(Storage(storage.uri_of("exp")))
    assert written["groups"] == [[t.index for t in group] for group in loaded.groups]
    assert [t["index"] for t in written["trials"]] == list(range(12))
    assert written["trials"][3]["labels"] == loaded.trials[3].labels
    assert written["resources"] == {"cpu": 2.0, "gpu": 0.5} and written["planned"] == 12
    assert plan.has_plan(storage, "exp") and not plan.has_plan(storage, "other")
    assert plan.planned_space(storage, "exp") == ("SPACE TEXT", {"epochs": 2})


def test_an_optuna_plan_holds_the_base_its_samples_complete(tmp_path):
    loaded = space.load(QUICKSTART.with_name("optuna_lr_wd.yaml"))
    storage = Storage(str(tmp_path))
    plan.write_plan(storage, "exp", loaded, "", {}, loaded.resources)
    written = plan.read_plan(Storage(storage.uri_of("exp")))
    assert written["trials"] == [] and written["planned"] == loaded.search.samples
    assert written["base"] == loaded.trials[0].config.to_dict() == loaded.sampling_base
    assert written["base_labels"] == loaded.trials[0].labels


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "has no tune_kd_plan.json"),
        ("{not json", "is unreadable"),
        ("[1, 2]", "is not a plan"),
    ],
)
def test_an_unreadable_plan_is_one_plan_error_naming_it(tmp_path, content, problem):
    if content is not None:
        (tmp_path / plan.PLAN_FILE).write_text(content)
    with pytest.raises(plan.PlanError, match=problem) as raised:
        plan.read_plan(Storage(str(tmp_path)))
    assert str(tmp_path) in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(plan.PlanError, match="no experiment folder"):
        plan.read_plan(Storage(str(tmp_path / "missing")))


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"space_text": ""}'])
def test_a_plan_resume_cannot_read_is_a_plan_error(tmp_path, content):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / plan.PLAN_FILE).write_text(content)
    with pytest.raises(plan.PlanError, match="is not a readable plan"):
        plan.planned_space(Storage(str(tmp_path)), "exp")


def test_planned_folder_names_parse_back_and_sampled_ones_do_not():
    for position in (0, 7, 1234):
        for grouped in (False, True):
            name = plan.trial_folder_name(position, grouped)
            assert name.startswith(plan.FOLDER_PREFIXES)
            match = plan.TRIAL_FOLDER.fullmatch(name)
            assert match is not None and int(match[1]) == position
    assert plan.trial_folder_name(7, grouped=False) == "trial_0007"
    sampled = plan.sampled_folder_name("8a64b_00003")  # Tune's ids: hex, `_`, a counter
    assert sampled.startswith(plan.FOLDER_PREFIXES) and not plan.TRIAL_FOLDER.fullmatch(sampled)


def student_row(epoch: int, acc: float) -> dict:
    return {"epoch": epoch, "test_acc": acc, "best_test_acc": acc, "test_acc_top5": acc + 20}


def test_a_group_result_puts_each_student_under_members_and_the_best_on_top():
    result = plan.group_result({3: student_row(1, 50.0), 9: student_row(1, 61.0)})
    assert result[plan.MEMBERS] == {
        plan.member_key(3): student_row(1, 50.0),
        plan.member_key(9): student_row(1, 61.0),
    }
    assert (result["epoch"], result["test_acc"], result["best_test_acc"]) == (1, 61.0, 61.0)


def test_the_results_tables_read_each_student_of_a_group_as_the_sweep_wrote_it(tmp_path):
    """The sweep's side of every contract (plan, folder names, group results) read by
    tune_kd.analysis: each planned trial's row has its own student's accuracy."""
    loaded = grouped_space()
    storage = Storage(str(tmp_path))
    plan.write_plan(storage, "exp", loaded, "", {}, space.Resources(1, 0.0))
    accuracy = {t.index: 40.0 + t.index for t in loaded.trials}
    for position, group in enumerate(loaded.groups):
        folder = tmp_path / "exp" / plan.trial_folder_name(position, grouped=True)
        folder.mkdir()
        lines = []
        for epoch in (1, 2):
            rows = {t.index: student_row(epoch, accuracy[t.index] + epoch) for t in group}
            lines.append({**plan.group_result(rows), "time_total_s": 10.0 * epoch})
        (folder / "result.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    trials = analysis.load_experiment(str(tmp_path / "exp")).trials
    assert len(trials) == 12 and set(trials["status"]) == {"completed"}
    index = {tuple(t.axes.values()): t.index for t in loaded.trials}
    for row in trials.itertuples():
        assert row.best_test_acc == accuracy[index[row.loss, row.lr, row.seed]] + 2
