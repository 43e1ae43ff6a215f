"""The Ray Tune wrapper of `tune_kd.train`: one Tune trial trains one run (a student, or a group
of students sharing the teacher's pass), reporting once per epoch with a checkpoint.

The dataset and the teachers' weights arrive through Ray's object store (`tune.with_parameters`),
loaded once by the driver; a retried trial resumes from its last checkpoint.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import tune

from tune_kd.config import Config
from tune_kd.data import Arrays
from tune_kd.train import Run

RUN_STATE = "run.pt"


def members_of(
    params: Mapping[str, Any], plan: Sequence[Sequence[dict[str, Any]]], base: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The students of a trial: a planned one (or group), or one with values Optuna sampled."""
    if "index" in params:
        return list(plan[params["index"]])
    return [{"index": None, "axes": dict(params), "config": {**base, **params}}]


def student_file(index: int) -> str:
    """File name of a finished student's weights in its trial's last checkpoint."""
    return f"student-{index}.pth"


def train_trial(
    params: dict[str, Any],
    *,
    plan: Sequence[Sequence[dict[str, Any]]],
    base: Mapping[str, Any],
    data: Mapping[str, Arrays],
    teachers: Mapping[str, Mapping[str, np.ndarray]],
    threads: int = 1,
) -> None:
    """The function trainable. `plan` holds the students of each planned trial, `base` the keys
    Optuna's samples complete, `data` each dataset by `Config.data_key`, `teachers` the weights
    of each teacher checkpoint."""
    torch.set_num_threads(threads)
    members = members_of(params, plan, base)
    configs = [Config.from_dict(m["config"]) for m in members]
    first = configs[0]
    teacher = teachers.get(first.teacher_checkpoint or "")
    run = Run(configs, data=data[first.data_key], teacher_state=teacher)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            run.load(Path(folder) / RUN_STATE)
    while not run.done:
        metrics = run.train_epoch()
        with tempfile.TemporaryDirectory() as folder:
            run.save(Path(folder) / RUN_STATE)
            if run.done:
                for i in range(len(members)):
                    run.export_student(i, Path(folder) / student_file(i))
            tune.report(
                trial_metrics(metrics, members), checkpoint=tune.Checkpoint.from_directory(folder)
            )


def trial_metrics(
    metrics: list[dict[str, Any] | None], members: list[dict[str, Any]]
) -> dict[str, Any]:
    """One Tune result: a lone student's metrics as they are; a group's under `members`, keyed by
    plan index, with the group's best accuracies on top for the progress table."""
    if len(members) == 1:
        assert metrics[0] is not None
        return dict(metrics[0])
    reported = {str(m["index"]): row for m, row in zip(members, metrics) if row is not None}
    rows = list(reported.values())
    return {
        "epoch": rows[0]["epoch"],
        "test_acc": max(r["test_acc"] for r in rows),
        "best_test_acc": max(r["best_test_acc"] for r in rows),
        "test_acc_top5": max(r["test_acc_top5"] for r in rows),
        "members": reported,
    }
