"""The two frames of an experiment: one row per planned trial (`trials_frame`) and one row per
trial and epoch (`epochs_frame`). A trial's status is the first of these that holds:

- `error`: Tune says ERROR, or (without a runner state) `error.txt` and not all epochs done; its
  last failure's message (from `error.txt`) is in the `error` column and the summary;
- `diverged`: its last result says `diverged`;
- `completed`: every planned epoch done, or Tune says TERMINATED (an ASHA stop included);
- `pending`: no trial folder yet, whether or not Tune's runner state has an entry for it (a trial
  Tune has queued has one);
- `running`: anything else, also the unfinished trials of an interrupted experiment.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from tune_kd.analysis.read import list_entries, read_folders, read_plan, read_states
from tune_kd.analysis.runs import TrialRun, last_value, planned_runs, sampled_runs
from tune_kd.storage import Storage

log = logging.getLogger(__name__)

STATUSES = ("completed", "diverged", "error", "running", "pending")

TRIAL_RESULTS = {
    "best_test_acc": "float64",
    "best_epoch": "Int64",
    "final_test_acc": "float64",
    "final_test_acc_top5": "float64",
    "epochs_done": "int64",
    "epochs_planned": "Int64",
    "wall_seconds": "float64",
    "gpu_fraction": "float64",
    "gpu_hours": "float64",
    "teacher_test_acc": "float64",
    "error": "string",  # the message of a trial that ended in error
}


@dataclass
class Experiment:
    """A read experiment: its plan, one row per planned trial, one row per trial and epoch, and
    what could not be read."""

    location: str
    plan: dict[str, Any]
    trials: pd.DataFrame
    epochs: pd.DataFrame
    problems: list[str]

    @property
    def name(self) -> str:
        return str(self.plan.get("name") or self.location.rsplit("/", 1)[-1])


def load_experiment(location: str) -> Experiment:
    """Read a Tune experiment folder with its plan; a missing or planless folder raises
    ExperimentError. Unreadable files are listed in `problems` (and logged), never fatal."""
    storage = Storage(str(location))
    plan = read_plan(storage)
    problems: list[str] = []
    entries = list_entries(storage)
    states = read_states(storage, [n for n, is_dir in entries.items() if not is_dir], problems)
    folders = read_folders(storage, [n for n, is_dir in entries.items() if is_dir])
    for folder in folders.values():
        problems += folder.problems
    if plan.get("trials"):
        runs = planned_runs(plan, folders, states, problems)
    else:
        runs = sampled_runs(plan, folders, states)
    for problem in problems:
        log.warning("warning: %s", problem)
    epochs = epochs_frame(runs)
    gpu = float(plan.get("resources", {}).get("gpu") or 0.0)
    return Experiment(storage.uri, plan, trials_frame(runs, gpu), epochs, problems)


def epochs_frame(runs: Sequence[TrialRun]) -> pd.DataFrame:
    """One row per trial and epoch: every metric the trainable reported, and `trial_id`."""
    tables = [
        r.metrics.add_column(0, "trial_id", pa.array([r.trial_id] * r.metrics.num_rows))
        for r in runs
        if r.metrics.num_rows
    ]
    if not tables:
        return pd.DataFrame({"trial_id": pd.Series([], dtype=str), "epoch": np.array([], np.int64)})
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


def trials_frame(runs: Sequence[TrialRun], gpu_fraction: float) -> pd.DataFrame:
    """One row per planned trial: id, status, labels, accuracies, epochs, time and GPU-hours."""
    records = [trial_record(run, gpu_fraction) for run in runs]
    labels = list(dict.fromkeys(k for run in runs for k in run.labels))
    columns = {key: pd.Series([r[key] for r in records]) for key in ("trial_id", "status")}
    for key in labels:
        columns[key] = label_column([r.get(key) for r in records])
    for key, dtype in TRIAL_RESULTS.items():
        columns[key] = pd.Series([r[key] for r in records], dtype=dtype)
    return pd.DataFrame(columns)


def trial_record(run: TrialRun, gpu_fraction: float) -> dict[str, Any]:
    results = epoch_results(run.metrics)
    wall = run.wall_seconds
    status = trial_status(run, results["epochs_done"], results.pop("diverged"))
    return {
        "trial_id": run.trial_id,
        "status": status,
        **run.labels,
        **results,
        "epochs_planned": run.epochs_planned,
        "wall_seconds": wall,
        "gpu_fraction": gpu_fraction,
        "gpu_hours": None if wall is None else wall * gpu_fraction / 3600 / run.group_size,
        "error": (run.error or "unknown error") if status == "error" else None,
    }


def epoch_results(metrics: pa.Table) -> dict[str, Any]:
    """Best accuracy and its epoch, the last epoch's accuracies, epochs done, teacher accuracy."""
    results: dict[str, Any] = {
        "best_test_acc": None,
        "best_epoch": None,
        "final_test_acc": last_value(metrics, "test_acc"),
        "final_test_acc_top5": last_value(metrics, "test_acc_top5"),
        "epochs_done": metrics.num_rows,
        "teacher_test_acc": None,
        "diverged": bool(last_value(metrics, "diverged")),
    }
    teacher = numbers(metrics, "teacher_test_acc")
    if np.isfinite(teacher).any():
        results["teacher_test_acc"] = float(teacher[np.isfinite(teacher)][-1])
    best = numbers(
        metrics, "best_test_acc" if "best_test_acc" in metrics.column_names else "test_acc"
    )
    if np.isfinite(best).any():
        at = int(np.nanargmax(np.where(np.isfinite(best), best, np.nan)))
        results["best_test_acc"] = float(best[at])
        results["best_epoch"] = int(metrics.column("epoch")[at].as_py())
    return results


def numbers(metrics: pa.Table, key: str) -> np.ndarray:
    """A column as floats (nulls as NaN); no such column: no values."""
    if key not in metrics.column_names:
        return np.array([], dtype=float)
    return np.asarray(metrics.column(key).to_numpy(zero_copy_only=False), dtype=float)


def trial_status(run: TrialRun, epochs_done: int, diverged: bool) -> str:
    """completed, diverged, error, running or pending: the rules are in the module docstring."""
    finished = run.epochs_planned is not None and epochs_done >= run.epochs_planned
    if run.state == "ERROR" or (run.error and run.state is None and not finished):
        return "error"
    if diverged:
        return "diverged"
    if finished or run.state == "TERMINATED":
        return "completed"
    if run.folder is None and epochs_done == 0:
        return "pending"
    return "running"


def label_column(values: list) -> pd.Series:
    """Integers as Int64, flags as boolean, numbers as float64, the rest as text (nulls kept)."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pd.Series(values, dtype="boolean")
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pd.Series(values, dtype="Int64")
    if present and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return pd.Series(values, dtype="float64")
    return pd.Series([v if v is None else str(v) for v in values])


def label_keys(trials: pd.DataFrame) -> list[str]:
    return [c for c in trials.columns if c not in ("trial_id", "status", *TRIAL_RESULTS)]
