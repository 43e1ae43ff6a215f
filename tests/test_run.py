"""Sweeps under a local Ray: the quickstart end to end, cached teachers, a resumed sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from tune_kd import models, run
from tune_kd import space as spaces

ROOT = Path(__file__).parents[1]
QUICK = [
    "--space",
    str(ROOT / "search_spaces" / "quickstart.yaml"),
    "--set",
    "synthetic_train_size=128",
    "--set",
    "synthetic_test_size=64",
    "--set",
    "batch_size=32",
    "--set",
    "epochs=2",
    "--set",
    "lr_decay_epochs=[1]",
    "--set",
    "lr=[0.05]",
    "--set",
    "seed=[0]",
    "--set",
    "teacher_train.epochs=1",
    "--set",
    "teacher_train.lr_decay_epochs=[1]",
]


def sweep(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tune_kd.run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def epochs_of(trial: Path) -> list[int]:
    lines = (
        (trial / "result.json").read_text().splitlines() if (trial / "result.json").exists() else []
    )
    return [json.loads(line)["epoch"] for line in lines]


@pytest.fixture(scope="session")
def quick(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    storage = tmp_path_factory.mktemp("results")
    done = sweep(*QUICK, "--storage", str(storage), "--name", "quick")
    assert done.returncode == 0, done.stderr[-3000:]
    return storage, done


def test_the_quickstart_runs_end_to_end_on_cpus(quick):
    storage, done = quick
    experiment = storage / "quick"
    plan = json.loads((experiment / "tune_kd_plan.json").read_text())
    assert plan["planned"] == 3 and plan["axes"] == ["loss", "lr", "seed"]
    assert plan["resources"] == {"cpu": 1.0, "gpu": 0.0}
    for index in range(3):
        assert epochs_of(experiment / f"trial_{index:04d}") == [1, 2]
    assert done.stdout.count("no GPU on this machine") == 1
    assert "training 1 teacher(s) first: resnet14" in done.stdout
    assert str(experiment) in done.stdout and "3 planned: 3 completed" in done.stdout
    for name in ("trials.parquet", "epochs.parquet", "summary.md", "summary.csv", "summary.tex"):
        assert (experiment / "results" / name).exists()


def test_the_report_notebook_runs_against_the_quickstart(quick, monkeypatch):
    storage, _ = quick
    notebook = nbformat.read(ROOT / "analysis" / "sweep_report.ipynb", as_version=4)
    monkeypatch.setenv("TUNE_KD_EXPERIMENT", str(storage / "quick"))
    NotebookClient(notebook, timeout=300, kernel_name="python3").execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "3 planned: 3 completed" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_the_report_notebook_reads_a_path_relative_to_the_project(
    pending_experiment, tmp_path, monkeypatch
):
    """As `jupyter nbconvert --execute analysis/sweep_report.ipynb` runs it from the project's
    folder: the kernel in analysis/, the experiment's path given relative to the project."""
    experiment = pending_experiment(tmp_path / "pending", trials=2)
    notebook = nbformat.read(ROOT / "analysis" / "sweep_report.ipynb", as_version=4)
    monkeypatch.setenv("TUNE_KD_EXPERIMENT", os.path.relpath(experiment, ROOT))
    in_analysis = {"metadata": {"path": str(ROOT / "analysis")}}
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources=in_analysis).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "trials: 2 planned: " in text and " 2 pending" in text


def test_the_teacher_is_cached_in_the_fields_format(quick):
    storage, _ = quick
    [checkpoint] = (storage / "teachers").glob("resnet14_vanilla-*/ckpt_epoch_1.pth")
    model = models.load_checkpoint(checkpoint)
    assert type(model).__name__ and model.get_classifier().out_features == 10


def test_an_interrupted_sweep_of_groups_resumes_without_rerunning_finished_ones(
    quick, inject_faults
):
    """Two groups of three students sharing a teacher pass (one per seed), trained as one fused
    model each, run one at a time, interrupted while the second is held before its second epoch
    (tests/faults/sitecustomize.py), then resumed."""
    storage, _ = quick
    held = storage / "faults.log"
    hold = {"group_0001": {"epoch": 2, "kind": "hold", "times": 1, "wait": True}}
    env = {**os.environ, **inject_faults(hold, held)}
    args = [
        *QUICK,
        "--set",
        "seed=[0,1]",
        "--set",
        "group_students=true",
        "--set",
        "fuse_students=true",
        "--set",
        "epochs=3",
        "--max-concurrent",
        "1",
        "--storage",
        str(storage),
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "tune_kd.run", *args, "--name", "resume"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    experiment = storage / "resume"
    deadline = time.monotonic() + 300
    while "group_0001 hold 2" not in held.read_text():
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the second group never reached its second epoch"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    first = process.communicate(timeout=300)[0]
    assert "training 1 teacher" not in first  # the first sweep's teacher was reused
    assert epochs_of(experiment / "group_0000") == [1, 2, 3]
    finished_before = (experiment / "group_0000" / "result.json").read_text()
    assert epochs_of(experiment / "group_0001") == [1]  # interrupted before its end

    resumed = sweep(
        "--resume",
        "--name",
        "resume",
        "--storage",
        str(storage),
        "--space",
        str(ROOT / "search_spaces" / "quickstart.yaml"),
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert (experiment / "group_0000" / "result.json").read_text() == finished_before
    assert epochs_of(experiment / "group_0001") == [1, 2, 3]
    trials = pd.read_parquet(experiment / "results" / "trials.parquet")
    assert len(trials) == 6 and set(trials["status"]) == {"completed"}
    assert sorted(trials["seed"]) == [0, 0, 0, 1, 1, 1]
    assert "6 planned: 6 completed" in resumed.stdout


def test_a_dry_run_starts_nothing(tmp_path):
    done = sweep(*QUICK, "--dry-run", "--storage", str(tmp_path / "results"))
    assert done.returncode == 0
    assert "\n3 trials" in done.stdout and "teacher resnet14: trained first" in done.stdout
    assert not (tmp_path / "results").exists()
    assert "Ray" not in done.stdout + done.stderr


def test_missing_cifar_is_one_line_and_nothing_is_written(tmp_path):
    env = {**os.environ, "TUNE_KD_DATA": str(tmp_path / "data")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tune_kd.run",
            "--space",
            str(ROOT / "search_spaces" / "teachers.yaml"),
            "--set",
            "download=false",
            "--storage",
            str(tmp_path / "results"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and str(tmp_path / "data") in done.stderr
    assert not (tmp_path / "results").exists()


def progress_text(space_file: Path, overrides: dict, monkeypatch) -> str:
    """Tune's progress report for the trials it would create from a space: each one running and
    past its first epoch, as the reporter prints it every 30 seconds."""
    from ray.tune.experiment import Trial
    from ray.tune.search.variant_generator import generate_variants
    from ray.tune.utils.log import Verbosity, set_verbosity

    monkeypatch.setattr(Trial, "local_experiment_path", property(lambda self: "experiment"))
    monkeypatch.setattr(Trial, "local_path", property(lambda self: None))
    space = spaces.load(space_file, overrides)
    set_verbosity(1)  # as a sweep's first `fit` leaves it (the teachers' trials)
    reporter = run.progress_reporter(space)
    set_verbosity(Verbosity.V3_TRIAL_DETAILS)
    reporter.set_search_properties(space.metric, "max")
    trials = []
    for number, (_, config) in enumerate(generate_variants(spaces.param_space(space))):
        trial = Trial("train_trial", config=config, stub=True)
        trial.set_status(Trial.RUNNING)
        result = {"epoch": 1, "test_acc": 10.0 + number, "best_test_acc": 10.0 + number}
        trial.update_last_result({**result, "config": config})
        trials.append(trial)
    return reporter._progress_str(trials, False)


def test_the_progress_report_of_groups_shows_what_every_group_shares(monkeypatch):
    """Groups of six students (3 losses x 2 lrs) per seed: only `seed` is one value per group."""
    overrides = {"group_students": True}
    text = progress_text(ROOT / "search_spaces" / "quickstart.yaml", overrides, monkeypatch)
    assert "parameters={'students': 6, 'seed': 1}" in text
    header = next(line for line in text.splitlines() if line.startswith("| Trial name"))
    assert [c.strip() for c in header.split("|")[4:6]] == ["students", "seed"]
    assert "Number of trials: 2 (2 RUNNING)" in text
    assert "loss" not in text and " lr " not in text


def test_the_progress_report_of_optuna_shows_the_sampled_values(monkeypatch):
    text = progress_text(ROOT / "search_spaces" / "optuna_lr_wd.yaml", {}, monkeypatch)
    header = next(line for line in text.splitlines() if line.startswith("| Trial name"))
    assert "lr" in header and "weight_decay" in header
    assert "Current best trial:" in text and "'weight_decay': " in text


@pytest.mark.parametrize("name", ["../../escape", "a/b", "/tmp/abs", "..", "", ".hidden", "a\\b"])
def test_an_experiment_name_is_one_folder_of_the_storage(name, tmp_path, capsys):
    storage = tmp_path / "store" / "results"
    argv = [*QUICK, "--storage", str(storage), "--name", name]
    for extra in (["--dry-run"], []):
        assert run.main([*argv, *extra]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "'--name'" in error and "quickstart.yaml" in error
    assert not (tmp_path / "store").exists() and not (tmp_path / "escape").exists()
