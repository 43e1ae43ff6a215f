"""Shared fixtures and helpers: a small teacher checkpoint in the field's layout, tiny
configurations, an experiment folder of pending trials, the environment that injects faults into a
sweep, a sweep run as the command line runs it, and the epochs a trial's folder holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch

from tune_kd import models

# The tests' models are tiny: on a machine of few cores shared with other work, a second torch
# thread mostly waits for the first, and the suite runs several times slower. (Sweeps, in their
# own processes, set their trials' threads themselves.)
torch.set_num_threads(1)

ROOT = Path(__file__).parents[1]
FAULT_INJECTOR = Path(__file__).parent / "faults"  # its sitecustomize.py injects the faults


def save_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """A checkpoint as RepDistiller writes them: `{'model': state_dict, 'epoch', 'best_acc'}`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "epoch": 240, "best_acc": 0.0}, path)
    return path


@pytest.fixture(scope="session")
def teacher_checkpoint(tmp_path_factory) -> Path:
    """An untrained resnet14 with 10 classes, saved as `resnet14_vanilla/ckpt_epoch_240.pth`."""
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("teachers")
    return save_checkpoint(
        models.create("resnet14", 10), folder / "resnet14_vanilla" / "ckpt_epoch_240.pth"
    )


def tiny_config(teacher_checkpoint: Path) -> dict:
    """A SimKD run on a few synthetic images, distilling from `teacher_checkpoint`: seconds on a
    CPU."""
    return {
        "dataset": "synthetic",
        "synthetic_train_size": 96,
        "synthetic_test_size": 64,
        "teacher": "resnet14",
        "teacher_checkpoint": str(teacher_checkpoint),
        "student": "resnet8",
        "method": "simkd",
        "batch_size": 32,
        "epochs": 2,
        "lr_decay_epochs": [1],
        "device": "cpu",
    }


@pytest.fixture
def tiny(teacher_checkpoint) -> dict:
    """A SimKD run on a few synthetic images: seconds on a CPU."""
    return tiny_config(teacher_checkpoint)


@pytest.fixture(scope="session")
def simkd_run(teacher_checkpoint, tmp_path_factory) -> Path:
    """The folder of a finished one-epoch `tiny` SimKD run, as `python -m tune_kd.train` writes
    it (`checkpoint.pt`, `student.pth`): the stage 1 that method `sequential` starts from."""
    from tune_kd.train import main

    out = tmp_path_factory.mktemp("simkd") / "run"
    config = {**tiny_config(teacher_checkpoint), "epochs": 1}
    flags = [
        part
        for key, value in config.items()
        for part in (f"--{key.replace('_', '-')}", json.dumps(value).strip('"'))
    ]
    assert main([*flags, "--out", str(out)]) == 0
    return out


def write_pending_experiment(root: Path, trials: int = 1) -> Path:
    """An experiment folder whose plan has `trials` trials, none started: enough for the analysis
    to write every table and plot."""
    labels = {"teacher": None, "student": "resnet8", "method": "student", "loss": None}
    plan = {
        "name": "pending",
        "planned": trials,
        "axes": ["seed"],
        "groups": [[seed] for seed in range(trials)],
        "metric": "best_test_acc",
        "resources": {"cpu": 1, "gpu": 0},
        "trials": [
            {
                "index": seed,
                "axes": {"seed": seed},
                "labels": {**labels, "projector": None, "lr": 0.05, "seed": seed},
                "config": {"epochs": 2},
            }
            for seed in range(trials)
        ],
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "tune_kd_plan.json").write_text(json.dumps(plan))
    return root


@pytest.fixture
def pending_experiment() -> Callable[..., Path]:
    return write_pending_experiment


def fault_variables(faults: dict, log: Path) -> dict[str, str]:
    """The environment variables that make every Python process started with them (Ray's workers
    inherit them) inject `faults` (see tests/faults/sitecustomize.py), logging each in `log`."""
    log.touch()
    paths = [str(FAULT_INJECTOR), str(ROOT), os.environ.get("PYTHONPATH")]
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, paths)),
        "TUNE_KD_TEST_FAULTS": json.dumps(faults),
        "TUNE_KD_TEST_FAULT_LOG": str(log),
    }


@pytest.fixture
def inject_faults() -> Callable[[dict, Path], dict[str, str]]:
    return fault_variables


def sweep(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`python -m tune_kd.run ARGS` from the project's folder, run to its end with its output
    captured; `env`: variables set on top of this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "tune_kd.run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def result_lines(trial: Path) -> list[dict]:
    """What a trial's folder reports, one line per epoch; a last line cut mid-write (the trial
    is still running) is left out."""
    path = trial / "result.json"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def epochs_of(trial: Path) -> list[int]:
    """The epochs a trial's folder reports, in the order they were written."""
    return [line["epoch"] for line in result_lines(trial)]


GOLDEN = Path(__file__).parent / "golden" / "methods.json"


def golden_cases(method: str) -> list[dict]:
    """The cases of `method` in the golden fixture (tests/golden/README.md): losses and gradients
    computed by the authors' code on small float64 inputs."""
    return [c for c in json.loads(GOLDEN.read_text())["cases"] if c["method"] == method]


def golden_tensor(entry: Mapping) -> torch.Tensor:
    """One tensor of the golden fixture."""
    dtype = {"float64": torch.float64, "int64": torch.int64}[entry["dtype"]]
    return torch.tensor(entry["values"], dtype=dtype).reshape(entry["shape"])
