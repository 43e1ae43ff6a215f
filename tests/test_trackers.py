"""Experiment trackers: a small sweep logs one MLflow run (a local folder store) and one offline W&B
run per Tune trial, with the trial's grid values as configuration and tags and its epochs as
metrics."""

from __future__ import annotations

import ast
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import sweep

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed")

SPACE = """
name: tracked
dataset: synthetic
synthetic_classes: 10
synthetic_train_size: 96
synthetic_test_size: 64
student: resnet8
method: student
batch_size: 32
epochs: 2
lr_decay_epochs: [1]
grid:
  lr: [0.05, 0.1]
  seed: [0, 1]
resources: {cpu: 1}
"""


def tracked_sweep(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """A sweep of the space above, written to `tmp_path`."""
    space = tmp_path / "tracked.yaml"
    space.write_text(SPACE)
    return sweep("--space", str(space), *args, env=env)


def mlflow_env(tmp_path: Path) -> dict[str, str]:
    """A local folder as MLflow's tracking store (MLflow asks for an opt-in to use one)."""
    return {
        "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
        "MLFLOW_ALLOW_FILE_STORE": "true",
    }


def mlflow_runs(tmp_path: Path, experiment: str, monkeypatch) -> tuple[Any, list]:
    for key, value in mlflow_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    client = mlflow.MlflowClient(mlflow_env(tmp_path)["MLFLOW_TRACKING_URI"])
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment}"
    return client, client.search_runs([found.experiment_id])


@pytest.mark.e2e
def test_every_trial_is_one_tracker_run_with_its_grid_values(tmp_path, monkeypatch):
    wandb = importlib_or_none("wandb")
    wandb_dir = tmp_path / "wandb"
    env = {**mlflow_env(tmp_path), "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir)}
    args = ["--storage", str(tmp_path / "results"), "--name", "tracked", "--tracker", "mlflow"]
    if wandb:
        args += ["--tracker", "wandb"]
    done = tracked_sweep(tmp_path, *args, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    client, runs = mlflow_runs(tmp_path, "tracked", monkeypatch)
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    cells = sorted((r.data.params["lr"], r.data.params["seed"]) for r in runs)
    assert cells == [("0.05", "0"), ("0.05", "1"), ("0.1", "0"), ("0.1", "1")]
    for run in runs:
        tags = run.data.tags
        assert (tags["lr"], tags["seed"]) == (run.data.params["lr"], run.data.params["seed"])
        assert tags["cell"] == f"lr={run.data.params['lr']}"  # seeds of a cell share it
        history = client.get_metric_history(run.info.run_id, "test_acc")
        assert sorted(m.step for m in history) == [1, 2]  # one point per epoch
        assert {m.step for m in client.get_metric_history(run.info.run_id, "epoch")} == {1, 2}

    if wandb:  # offline runs: one per trial
        offline = sorted(wandb_dir.glob("wandb/offline-run-*"))
        assert len(offline) == 4
        for folder in offline:
            log = (folder / "logs" / "debug.log").read_text()
            config = ast.literal_eval(re.search(r"^config: (.*)$", log, re.MULTILINE)[1])
            records = next(folder.glob("*.wandb")).read_bytes()  # W&B's own binary log
            for axis in ("lr", "seed"):
                assert f"{axis}={config[axis]}".encode() in records  # the run's tags
            assert b"test_acc" in records


@pytest.mark.e2e
def test_a_group_of_students_is_one_run_with_each_students_metrics(tmp_path, monkeypatch):
    done = tracked_sweep(
        tmp_path,
        "--storage",
        str(tmp_path / "results"),
        "--name",
        "grouped",
        "--set",
        "group_students=true",
        "--set",
        "trackers=[mlflow]",
        env=mlflow_env(tmp_path),
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    plan = json.loads((tmp_path / "results" / "grouped" / "tune_kd_plan.json").read_text())
    client, runs = mlflow_runs(tmp_path, "grouped", monkeypatch)
    assert len(runs) == len(plan["groups"]) == 2  # one run per Tune trial: a group per seed
    for run in runs:
        group = plan["groups"][int(run.data.params["index"])]
        assert run.data.params["students"] == str(len(group)) and "lr" not in run.data.params
        assert run.data.tags["seed"] == run.data.params["seed"]
        for member in group:
            history = client.get_metric_history(run.info.run_id, f"members/{member}/test_acc")
            assert sorted(m.step for m in history) == [1, 2]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--tracker", "mlflow"], {"MLFLOW_TRACKING_URI": ""}, "mlflow needs MLFLOW_TRACKING_URI"),
        (["--set", "trackers=[tensorboard]"], {}, "expected one of mlflow, wandb"),
    ],
)
def test_a_tracker_that_cannot_log_is_one_line_before_anything_starts(tmp_path, args, env, message):
    done = tracked_sweep(tmp_path, *args, "--storage", str(tmp_path / "results"), env=env)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr and "trackers" in done.stderr
    assert not (tmp_path / "results").exists()


def importlib_or_none(name: str):
    try:
        return __import__(name)
    except ImportError:
        return None
