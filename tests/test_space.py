"""Search-space files: expansion into trials, and dry runs (bad files: tests/test_bad_input.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tune_kd import run, space, teachers

SHIPPED = Path(__file__).parents[1] / "search_spaces"

# The trial counts the study's slides and the paper's tables call for.
EXPECTED_TRIALS = {
    "quickstart.yaml": 12,
    "methods_quick.yaml": 15,  # every method once
    "study_losses.yaml": 45,  # loss 3 x lr 5 x 3 seeds
    "study_multi_projector.yaml": 18,  # loss 2 x lr 3 x 3 seeds
    "study_all_projectors.yaml": 18,
    "study_teacher_correct.yaml": 18,
    "paper_table1.yaml": 276,  # 7 pairs x 9 methods x 4 seeds + 6 students x 4 seeds
    "paper_table2.yaml": 280,  # 7 pairs x 9 methods x 4 seeds + 7 students x 4 seeds
    "paper_table6.yaml": 28,  # 2 teacher groups x (aveg, aekd, simkd) x 4 seeds + 4 students
    "paper_methods_dkd.yaml": 44,  # DKD on mdistiller's 11 CIFAR-100 pairs x 4 seeds
    "paper_projectors.yaml": 28,  # 4 designs x 4 seeds + r in {1, 4, 8} x 4 seeds
    "paper_reuse.yaml": 36,  # student, KD, SimKD + reuse stage {1, 2} x r {1, 2, 4}, 4 seeds
    "paper_table4.yaml": 56,  # 7 pairs x 2 classifier inputs x 4 seeds
    "teachers.yaml": 6,  # 3 teachers + the further teachers of paper_table6.yaml
    "optuna_lr_wd.yaml": 24,
}


def test_every_shipped_file_is_listed_here():
    assert sorted(p.name for p in SHIPPED.glob("*.yaml")) == sorted(EXPECTED_TRIALS)


# Their dry runs count the FLOPs of some seventy networks' steps (about 15 s each on 2 cores).
WHOLE_PAPER_TABLES = ("paper_table1.yaml", "paper_table2.yaml")


@pytest.mark.parametrize("name", sorted(EXPECTED_TRIALS))
def test_each_shipped_file_plans_its_trials(name):
    assert space.load(SHIPPED / name).planned == EXPECTED_TRIALS[name]


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.e2e) if name in WHOLE_PAPER_TABLES else name
        for name in sorted(EXPECTED_TRIALS)
    ],
)
def test_dry_run_of_each_shipped_file(name, tmp_path, capsys):
    storage = tmp_path / "results"
    assert run.main(["--dry-run", "--space", str(SHIPPED / name), "--storage", str(storage)]) == 0
    out = capsys.readouterr().out
    assert f"\n{EXPECTED_TRIALS[name]} trials" in out
    assert "resources per trial" in out
    estimate = re.search(
        r"compute: (under )?([\d.]+) GPU-hours(?: \((?:under )?([\d.]+) one trial at a time\))?",
        out,
    )
    hours, alone = float(estimate[2]), float(estimate[3] or estimate[2])
    assert hours > 0 and hours <= alone
    synthetic = space.load(SHIPPED / name).trials[0].config.dataset == "synthetic"
    assert (estimate[1] is not None) == synthetic  # seconds on synthetic data
    assert (estimate[3] is not None) == space.load(SHIPPED / name).group_students
    assert not storage.exists()


def test_dry_run_of_trials_on_cpus_prints_no_gpu_hours(tmp_path, capsys):
    """Trials without a GPU: no GPU estimate applies to them, and none is printed as 0.0."""
    quickstart, storage = str(SHIPPED / "quickstart.yaml"), str(tmp_path / "results")
    argv = ["--dry-run", "--space", quickstart, "--set", "resources.gpu=0", "--storage", storage]
    assert run.main(argv) == 0
    out = capsys.readouterr().out
    assert "estimated compute: - (trials run on CPUs" in out and "GPU-hours" not in out


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
    overrides = {"lr": [0.05], "epochs": 3, "lr_decay_epochs": [2], "seed": 0}
    loaded = space.load(SHIPPED / "study_losses.yaml", overrides)
    assert len(loaded.trials) == 3
    assert {t.config.lr for t in loaded.trials} == {0.05}
    assert {t.config.epochs for t in loaded.trials} == {3}


def test_teachers_yaml_fills_the_cache_the_study_files_read():
    """A teacher trained by teachers.yaml has the recipe hash an on-demand teacher looks for."""
    trained = space.load(SHIPPED / "teachers.yaml").trials
    needed = space.load(SHIPPED / "study_losses.yaml").teachers
    [need] = needed
    [same] = [t for t in trained if t.config.student == need.arch]
    assert teachers.recipe_hash(same.config) == teachers.recipe_hash(need.recipe)
    other = space.load(SHIPPED / "teachers.yaml", {"seed": 1}).trials[0]
    assert teachers.recipe_hash(other.config) != teachers.recipe_hash(need.recipe)


def test_optuna_samples_its_ranges():
    loaded = space.load(SHIPPED / "optuna_lr_wd.yaml")
    assert loaded.search.algorithm == "optuna" and loaded.planned == 24
    assert loaded.search.ranges["lr"] == space.Range("loguniform", (0.001, 0.2))
    assert loaded.scheduler == space.Scheduler("asha", grace_period=155, reduction_factor=3.0)


def test_a_key_no_trial_s_method_reads_is_refused(tmp_path):
    """A method's own key given where no trial runs that method has no effect: refused, naming it.
    A key that some trial's method reads is accepted beside methods that do not."""
    file = tmp_path / "kd.yaml"
    file.write_text("teacher: resnet14\nteacher_train: {}\nmethod: kd\nprojector: multi\n")
    with pytest.raises(space.SpaceError, match="'projector': has no effect under method kd"):
        space.load(file)
    file.write_text(
        "teacher: resnet14\nteacher_train: {}\ngrid: {method: [kd, simkd]}\nprojector: multi\n"
    )
    assert {t.config.projector for t in space.load(file).trials} == {"multi"}
