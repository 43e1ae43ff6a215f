"""The Ray Tune wrapper of `tune_kd.train`: one Tune trial trains one run (a student, or a group
of students sharing the teacher's pass), reporting once per epoch with a checkpoint.

The dataset and the teachers' weights arrive through Ray's object store (`tune.with_parameters`),
loaded once by the driver; a retried trial resumes from its last checkpoint, or from the one before
(Tune keeps two) when the last cannot be read, or else starts over, saying so in one line; its
results so far are saved to the storage first (`KeepResultsOnRetry`).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import tune

from tune_kd.config import Config
from tune_kd.data import Arrays
from tune_kd.plan import group_result
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
    extra = [teachers.get(path) for path in first.extra_teacher_checkpoints]

    def new_run() -> Run:
        return Run(
            configs,
            data=data[first.data_key],
            teacher_state=teacher,
            extra_teacher_states=extra,
        )

    checkpoint = tune.get_checkpoint()
    run = new_run() if checkpoint is None else resume(new_run, checkpoint)
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


def resume(new_run: Callable[[], Run], checkpoint: tune.Checkpoint) -> Run:
    """A run continued from `checkpoint`, or from the newest earlier checkpoint beside it that can
    be read (a file cut off by a full disk or a lost node); from the start when none can."""
    run = new_run()
    unreadable = []
    for candidate in [checkpoint, *earlier_checkpoints(checkpoint)]:
        try:
            with candidate.as_directory() as folder:
                run.load(Path(folder) / RUN_STATE)
        except Exception as error:  # a cut or corrupt file: torch and zip raise many kinds
            reason = str(error).splitlines()[0] if str(error) else ""
            unreadable.append(f"{name_of(candidate)} ({type(error).__name__}: {reason})")
            continue
        if unreadable:
            say(f"resuming from {name_of(candidate)}, epoch {run.epoch}", unreadable)
        return run
    say("starting over from epoch 0", unreadable)
    return new_run()  # a failed load may have changed part of the state


def earlier_checkpoints(checkpoint: tune.Checkpoint) -> list[tune.Checkpoint]:
    """The trial's other checkpoints older than `checkpoint`, newest first."""
    from pyarrow.fs import FileSelector, FileType

    parent, name = checkpoint.path.rstrip("/").rsplit("/", 1)
    entries = checkpoint.filesystem.get_file_info(FileSelector(parent))
    older = [
        e.path
        for e in entries
        if e.type == FileType.Directory
        and e.base_name.startswith("checkpoint_")
        and e.base_name < name
    ]
    return [tune.Checkpoint(p, checkpoint.filesystem) for p in sorted(older, reverse=True)]


def name_of(checkpoint: tune.Checkpoint) -> str:
    return checkpoint.path.rstrip("/").rsplit("/", 1)[-1]


def say(outcome: str, unreadable: Sequence[str]) -> None:
    """One line in the trial's log (Ray keeps it in the worker's log file)."""
    print(f"unreadable checkpoint {'; '.join(unreadable)}: {outcome}", file=sys.stderr, flush=True)


def trial_metrics(
    metrics: list[dict[str, Any] | None], members: list[dict[str, Any]]
) -> dict[str, Any]:
    """One Tune result: a lone student's metrics as they are; a group's as `group_result`
    lays them out (each reporting student's under `members`, by plan index)."""
    if len(members) == 1:
        assert metrics[0] is not None
        return dict(metrics[0])
    return group_result({m["index"]: row for m, row in zip(members, metrics) if row is not None})


class KeepResultsOnRetry(tune.Callback):
    """Saves a failed trial's folder (its `result.json`: one line per epoch) to the storage before
    Tune retries it. A retried trial's result files are first copied back from the storage, which
    Tune updates only every few seconds: without this, the epochs the trial reported since then
    would vanish from its results, though its checkpoint has them."""

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from pyarrow.fs import copy_files

        if not Path(trial.local_path).is_dir():  # it failed before it started
            return
        storage = trial.storage
        copy_files(
            trial.local_path,
            storage.trial_fs_path,
            destination_filesystem=storage.storage_filesystem,
        )
