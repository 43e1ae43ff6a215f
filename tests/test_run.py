"""Sweeps under a local Ray: the quickstart end to end, cached teachers, a resumed sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import epochs_of, result_lines, sweep

from tune_kd import models, run, train

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


@pytest.fixture(scope="session")
def quick(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    storage = tmp_path_factory.mktemp("results")
    done = sweep(*QUICK, "--storage", str(storage), "--name", "quick")
    assert done.returncode == 0, done.stderr[-3000:]
    return storage, done


@pytest.mark.e2e
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
    trials = pd.read_parquet(experiment / "results" / "trials.parquet")
    assert sorted(trials["loss"]) == ["cosine", "kl", "l2"]
    assert set(trials["status"]) == {"completed"}
    epochs = pd.read_parquet(experiment / "results" / "epochs.parquet")
    assert sorted(zip(epochs["trial_id"], epochs["epoch"])) == [
        (f"trial_{index:04d}", epoch) for index in range(3) for epoch in (1, 2)
    ]


@pytest.mark.e2e
def test_the_teacher_is_cached_in_the_fields_format(quick):
    """The cached teacher is the field's checkpoint of the model the trials distilled from: its
    weights load strictly into a new resnet14 and score what it records and the trials measured."""
    storage, _ = quick
    experiment = storage / "quick"
    [checkpoint] = (storage / "teachers").glob("resnet14_vanilla-*/ckpt_epoch_1.pth")
    assert models.load_checkpoint(checkpoint).get_classifier().out_features == 10
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["epoch"] == 1
    models.create("resnet14", 10).load_state_dict(saved["model"])  # strict: every key and shape
    config = json.loads((experiment / "tune_kd_plan.json").read_text())["trials"][0]["config"]
    scored = train.Run([{**config, "device": "cpu"}], teacher_state=saved["model"])
    assert scored.teacher_test_acc == pytest.approx(saved["best_acc"])
    for index in range(3):  # every epoch of every trial measured the same teacher
        lines = result_lines(experiment / f"trial_{index:04d}")
        measured = [line["teacher_test_acc"] for line in lines]
        assert measured == [pytest.approx(saved["best_acc"])] * 2


@pytest.mark.e2e
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
    done = sweep(
        "--space",
        str(ROOT / "search_spaces" / "teachers.yaml"),
        "--set",
        "download=false",
        "--storage",
        str(tmp_path / "results"),
        env={"TUNE_KD_DATA": str(tmp_path / "data")},
        timeout=300,
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and str(tmp_path / "data") in done.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("name", ["../../escape", "a/b", "/tmp/abs", "..", "", ".hidden", "a\\b"])
def test_an_experiment_name_is_one_folder_of_the_storage(name, tmp_path, capsys):
    storage = tmp_path / "store" / "results"
    argv = [*QUICK, "--storage", str(storage), "--name", name]
    for extra in (["--dry-run"], []):
        assert run.main([*argv, *extra]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "'--name'" in error and "quickstart.yaml" in error
    assert not (tmp_path / "store").exists() and not (tmp_path / "escape").exists()


def stoppable_sweep(storage: Path, teacher: Path, *extra: str) -> list[str]:
    """The quickstart's six (loss, lr) trials of two epochs, two at a time, on a given teacher."""
    return [
        *QUICK,
        "--set",
        "lr=[0.05,0.3]",
        "--set",
        f"teacher_checkpoint={teacher}",
        "--max-concurrent",
        "2",
        "--storage",
        str(storage),
        *extra,
    ]


@pytest.mark.e2e
@pytest.mark.parametrize(
    "stop", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1], ids=["SIGINT", "SIGTERM", "SIGUSR1"]
)
def test_a_stopped_sweep_is_saved_and_resume_finds_and_finishes_it(
    stop, tmp_path, teacher_checkpoint, inject_faults
):
    """Stopped (Ctrl-C, a kill, SLURM's warning before a requeue) while its first two trials are
    held before their second epoch and four never started; then a finished experiment of the same
    space is run; `--resume` without `--name` continues the stopped one, each trial's epochs once,
    and then finds nothing to continue."""
    storage = tmp_path / "results"
    held = tmp_path / "faults.log"
    hold = {f"trial_000{i}": {"epoch": 2, "kind": "hold", "times": 1, "wait": True} for i in (0, 1)}
    space = str(ROOT / "search_spaces" / "quickstart.yaml")
    teacher = teacher_checkpoint
    process = subprocess.Popen(
        [sys.executable, "-m", "tune_kd.run", *stoppable_sweep(storage, teacher, "--name", "stop")],
        cwd=ROOT,
        env={**os.environ, **inject_faults(hold, held)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    while held.read_text().count(" hold 2") < 2:
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the first two trials never reached their 2nd epoch"
        time.sleep(0.2)
    process.send_signal(stop)
    first = process.communicate(timeout=300)[0]
    assert process.returncode == 128 + stop, first[-3000:]
    assert first.strip().splitlines()[-1] == (
        f"interrupted: 0 of 6 trials finished; continue with: python -m tune_kd.run"
        f" --space {space} --name stop --resume"
    )
    assert "0 completed, 0 diverged, 0 error, 2 running, 4 pending" in first
    experiment = storage / "stop"
    assert f"Result logdir: {experiment}\n" in first and "driver_artifacts" not in first
    assert [epochs_of(experiment / f"trial_000{i}") for i in (0, 1)] == [[1], [1]]

    finished = sweep(*stoppable_sweep(storage, teacher, "--set", "lr=[0.05]"))
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    resumed = sweep("--resume", "--space", space, "--storage", str(storage))
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert f"resuming {experiment}\n" in resumed.stdout
    for index in range(6):
        assert epochs_of(experiment / f"trial_{index:04d}") == [1, 2]
    assert "6 planned: 6 completed" in resumed.stdout
    table = [line for line in resumed.stdout.splitlines() if line.startswith("| trial_0000 ")]
    assert table and "| loss " in resumed.stdout and "| lr " in resumed.stdout
    assert "Current best trial: trial_000" in resumed.stdout
    assert f"Result logdir: {experiment}\n" in resumed.stdout
    assert "driver_artifacts" not in output

    again = sweep("--resume", "--space", space, "--storage", str(storage))
    assert again.returncode == 2 and again.stdout == ""
    assert (
        again.stderr.count("\n") == 1 and "no unfinished experiment of 'quickstart'" in again.stderr
    )
