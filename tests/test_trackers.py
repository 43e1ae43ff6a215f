"""Experiment trackers: a small sweep logs one MLflow run (a local folder store) and one offline W&B
run per planned trial, also for students trained in a group, with the trial's grid values,
configuration and `--set` values as parameters, its grid values as tags and its epochs as metrics;
a tracker that cannot start is one line before anything is written."""

from __future__ import annotations

import ast
import json
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import ray
from conftest import sweep

from tune_kd import plan, run
from tune_kd import space as spaces
from tune_kd.space import SpaceError
from tune_kd.storage import Storage

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
@pytest.mark.parametrize("grouped", [False, True], ids=["alone", "grouped"])
def test_every_planned_trial_is_one_tracker_run_with_its_values(tmp_path, monkeypatch, grouped):
    wandb = importlib_or_none("wandb")
    wandb_dir = tmp_path / "wandb"
    env = {**mlflow_env(tmp_path), "WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir)}
    args = ["--storage", str(tmp_path / "results"), "--name", "tracked", "--tracker", "mlflow"]
    args += ["--set", "epochs=2", "--set", f"group_students={str(grouped).lower()}"]
    if wandb:
        args += ["--tracker", "wandb"]
    done = tracked_sweep(tmp_path, *args, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    planned = json.loads((tmp_path / "results" / "tracked" / "tune_kd_plan.json").read_text())
    assert len(planned["groups"]) == (2 if grouped else 4)  # a group per seed: Tune's trials

    client, runs = mlflow_runs(tmp_path, "tracked", monkeypatch)
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    by_index = {int(r.data.params["index"]): r for r in runs}
    assert sorted(by_index) == [t["index"] for t in planned["trials"]]
    for trial in planned["trials"]:
        run = by_index[trial["index"]]
        params, tags = run.data.params, run.data.tags
        assert run.info.run_name == f"trial_{trial['index']:04d}"
        assert (params["lr"], params["seed"]) == (
            str(trial["axes"]["lr"]),
            str(trial["axes"]["seed"]),
        )
        assert params["epochs"] == "2" and params["group_students"] == str(grouped)  # --set
        assert params["student"] == "resnet8"  # the rest of its configuration
        assert (tags["lr"], tags["seed"]) == (params["lr"], params["seed"])
        assert tags["cell"] == f"lr={params['lr']}"  # seeds of a cell share it
        history = client.get_metric_history(run.info.run_id, "test_acc")
        assert sorted(m.step for m in history) == [1, 2]  # one point per epoch, its own
        assert {m.step for m in client.get_metric_history(run.info.run_id, "epoch")} == {1, 2}
        assert not [key for key in run.data.metrics if key.startswith("members/")]

    if wandb:  # offline runs: one per planned trial
        offline = sorted(wandb_dir.glob("wandb/offline-run-*"))
        assert len(offline) == 4
        seen = set()
        for folder in offline:
            log = (folder / "logs" / "debug.log").read_text()
            config = ast.literal_eval(re.search(r"^config: (.*)$", log, re.MULTILINE)[1])
            seen.add(config["index"])
            assert config["epochs"] == 2
            tags = [f"{axis}={config[axis]}".encode() for axis in ("lr", "seed")]
            records = wandb_records(folder, [*tags, b"test_acc"])
            for wanted in [*tags, b"test_acc"]:  # the run's tags and its metrics
                assert wanted in records
        assert seen == set(by_index)


def wandb_records(folder: Path, wanted: list[bytes], seconds: float = 30) -> bytes:
    """An offline run's binary log (`*.wandb`) once it holds everything `wanted`, or as it is
    after `seconds`: W&B's service process writes it on its own time, after the run finished."""
    deadline = time.monotonic() + seconds
    while True:
        records = next(folder.glob("*.wandb")).read_bytes()
        if all(w in records for w in wanted) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def unused_port() -> int:
    """A port of 127.0.0.1 that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


CANNOT_START = {
    "no MLflow store": (
        ["--tracker", "mlflow"],
        {"MLFLOW_TRACKING_URI": ""},
        "MLFLOW_TRACKING_URI",
    ),
    "a file store not allowed": (
        ["--tracker", "mlflow"],
        {"MLFLOW_TRACKING_URI": "file:{tmp}/mlruns", "MLFLOW_ALLOW_FILE_STORE": ""},
        "MLFLOW_ALLOW_FILE_STORE",
    ),
    "no MLflow server": (
        ["--tracker", "mlflow"],
        {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"},
        "MLFLOW_TRACKING_URI=http://127.0.0.1:",
    ),
    "W&B online without a key": (
        ["--tracker", "wandb"],
        {"WANDB_MODE": "online", "WANDB_API_KEY": "", "HOME": "{tmp}", "WANDB_CONFIG_DIR": "{tmp}"},
        "WANDB_API_KEY",
    ),
    "no such tracker": (["--set", "trackers=[tensorboard]"], {}, "expected one of mlflow, wandb"),
}


@pytest.mark.parametrize("dry_run", [False, True], ids=["sweep", "dry-run"])
@pytest.mark.parametrize("case", list(CANNOT_START))
def test_a_tracker_that_cannot_start_is_one_line_before_anything_starts(
    tmp_path, case, dry_run, monkeypatch, capsys
):
    """The command's `main`, in this process: the check comes before Ray or the storage."""
    args, env, setting = CANNOT_START[case]
    if case == "W&B online without a key":
        pytest.importorskip("wandb", reason="the wandb extra is not installed")
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path, port=unused_port()))
    space = tmp_path / "tracked.yaml"
    space.write_text(SPACE)
    args = ["--space", str(space), *args, "--storage", str(tmp_path / "results"), "--name", "t"]
    assert run.main([*args, *(["--dry-run"] if dry_run else [])]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert setting in err and "trackers" in err
    assert not (tmp_path / "results").exists()
    assert "Ray" not in out and not ray.is_initialized()


@pytest.mark.parametrize(
    "started", [None, "trial_0001", "experiment_state-2026-01-01_00-00-00.json"]
)
def test_a_sweep_that_failed_before_its_first_trial_can_run_again(tmp_path, started):
    space_file = tmp_path / "tracked.yaml"
    space_file.write_text(SPACE)
    storage = Storage(str(tmp_path / "results"))
    experiment = tmp_path / "results" / "tracked"
    experiment.mkdir(parents=True)
    (experiment / "tuner.pkl").write_bytes(b"")  # Tune writes it before any trial starts
    if started:  # a trial's folder, or Tune's saved state: --resume continues it
        (experiment / started).mkdir()
    (experiment / plan.PLAN_FILE).write_text("{}")

    run.forget_unstarted(storage, "tracked")

    args = run.get_args_parser().parse_args(["--space", str(space_file), "--name", "tracked"])
    if started:
        with pytest.raises(SpaceError, match="add --resume"):
            run.experiment_name(args, spaces.load(space_file), storage)
    else:
        assert run.experiment_name(args, spaces.load(space_file), storage) == "tracked"


def importlib_or_none(name: str):
    try:
        return __import__(name)
    except ImportError:
        return None
