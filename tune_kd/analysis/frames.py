"""The two frames of an experiment: one row per planned trial (`trials_frame`) and one row per
trial and epoch (`epochs_frame`). A trial's status is the first of these that holds:

- `error`: Tune says ERROR, or (without a runner state) `error.txt` and not all epochs done; its
  last failure's message (from `error.txt`) is in the `error` column and the summary;
- `diverged`: its last result says `diverged`;
- `completed`: every planned epoch done, or Tune says TERMINATED (an ASHA stop included);
- `pending`: no epoch reported, and no trial folder yet or Tune's runner state says PENDING (Tune
  makes the folders of the trials it queues, and records them as PENDING until they start; a
  stopped sweep's trials that never started stay so);
- `running`: anything else, also the started, unfinished trials of a stopped experiment.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from tune_kd.analysis.parsed import read_parsed, write_parsed
from tune_kd.analysis.read import (
    EMPTY,
    is_folder,
    list_entries,
    read_folders,
    read_plan,
    read_states,
)
from tune_kd.analysis.runs import TrialRun, planned_runs, sampled_runs
from tune_kd.storage import Storage

log = logging.getLogger(__name__)

STATUSES = ("completed", "diverged", "error", "running", "pending")

TRIAL_RESULTS = {
    "best_test_acc": "float64",
    "best_epoch": "Int64",
    "best_test_acc_top5": "float64",
    "final_test_acc": "float64",
    "final_test_acc_top5": "float64",
    "epochs_done": "int64",
    "epochs_planned": "Int64",
    "wall_seconds": "float64",
    "gpu_fraction": "float64",
    "gpu_hours": "float64",
    "cpu_hours": "float64",
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


def load_experiment(location: str, cache: str | None = None) -> Experiment:
    """Read a Tune experiment folder with its plan; a missing or planless folder raises
    ExperimentError. Unreadable files are listed in `problems` (and logged), never fatal.
    With a `cache` folder (the results folder), each result.json parsed is kept there, and one
    unchanged since the last analysis that kept it there is not parsed again (see `parsed`)."""
    storage = Storage(str(location))
    plan = read_plan(storage)
    problems: list[str] = []
    entries = list_entries(storage)
    files = [name for name, info in entries.items() if not is_folder(info)]
    states = read_states(storage, files, problems)
    kept = Storage(str(cache)) if cache is not None else None
    earlier = read_parsed(kept) if kept is not None else {}
    folders = read_folders(storage, [n for n, info in entries.items() if is_folder(info)], earlier)
    if kept is not None:
        write_parsed(kept, folders.values(), earlier)
    for folder in folders.values():
        problems += folder.problems
    if plan.get("trials"):
        runs = planned_runs(plan, folders, states, problems)
    else:
        runs = sampled_runs(plan, folders, states)
    for problem in problems:
        log.warning("warning: %s", problem)
    epochs = epochs_table(runs)
    trials = trials_frame(runs, epoch_results(runs, epochs), plan.get("resources") or {})
    return Experiment(storage.uri, plan, trials, epochs_frame(epochs), problems)


def epochs_table(runs: Sequence[TrialRun]) -> pa.Table:
    """One row per trial and epoch, the trials in the order of `runs`: `trial_id`, then every
    metric the trainable reported (a metric that a trial lacks is null in its rows)."""
    reported = [run for run in runs if run.metrics.num_rows]
    if not reported:
        return EMPTY
    table = pa.concat_tables([run.metrics for run in reported], promote_options="permissive")
    rows = np.repeat(np.arange(len(reported)), [run.metrics.num_rows for run in reported])
    trial_ids = pa.array([run.trial_id for run in reported], pa.string()).take(rows)
    return table.add_column(0, "trial_id", trial_ids)


def epochs_frame(epochs: pa.Table) -> pd.DataFrame:
    """The epochs table as a frame; without rows, a frame of `trial_id` and `epoch` only."""
    if not epochs.num_rows:
        return pd.DataFrame({"trial_id": pd.Series([], dtype=str), "epoch": np.array([], np.int64)})
    return epochs.to_pandas()


def trial_cost(run: TrialRun, resources: Mapping[str, Any]) -> dict[str, float | None]:
    """A trial's share of what its Ray trial held (the plan's `resources`, split between the
    students it trained): GPU-hours where it held a GPU, CPU-hours where it ran on CPUs only;
    None where unknown (no time yet, or a plan without resources)."""
    gpu, cpu = resources.get("gpu"), resources.get("cpu")
    hours = None if run.wall_seconds is None else run.wall_seconds / 3600 / run.group_size
    return {
        "gpu_fraction": None if gpu is None else float(gpu),
        "gpu_hours": hours * gpu if hours is not None and gpu else None,
        "cpu_hours": hours * cpu if hours is not None and gpu == 0 and cpu else None,
    }


def trials_frame(
    runs: Sequence[TrialRun], results: Sequence[dict[str, Any]], resources: Mapping[str, Any]
) -> pd.DataFrame:
    """One row per planned trial: id, status, labels, accuracies, epochs, time, and GPU-hours or
    CPU-hours (`trial_cost` of the plan's `resources`); `results` are the runs' `epoch_results`."""
    records = [trial_record(run, dict(r), resources) for run, r in zip(runs, results)]
    labels = list(dict.fromkeys(k for run in runs for k in run.labels))
    columns = {key: pd.Series([r[key] for r in records]) for key in ("trial_id", "status")}
    for key in labels:
        columns[key] = label_column([r.get(key) for r in records])
    for key, dtype in TRIAL_RESULTS.items():
        columns[key] = pd.Series([r[key] for r in records], dtype=dtype)
    return pd.DataFrame(columns)


def trial_record(
    run: TrialRun, results: dict[str, Any], resources: Mapping[str, Any]
) -> dict[str, Any]:
    """One run's row of the trials frame, from its `epoch_results`, what Tune says and the plan's
    `resources`."""
    status = trial_status(run, results["epochs_done"], results.pop("diverged"))
    return {
        "trial_id": run.trial_id,
        "status": status,
        **run.labels,
        **results,
        "epochs_planned": run.epochs_planned,
        "wall_seconds": run.wall_seconds,
        **trial_cost(run, resources),
        "error": (run.error or "unknown error") if status == "error" else None,
    }


def epoch_results(runs: Sequence[TrialRun], epochs: pa.Table) -> list[dict[str, Any]]:
    """Per run: best accuracy and its epoch, the best top-5 accuracy (over the epochs, as the best
    top-1's), the last epoch's accuracies and `diverged`, epochs done, teacher accuracy. Read
    from `epochs_table(runs)`, where each run's rows follow the previous run's; a metric counts
    where the run reported it."""
    counts = np.array([run.metrics.num_rows for run in runs], dtype=np.int64)
    ends = np.cumsum(counts)
    last = {key: last_values(epochs, key, ends - 1, counts) for key in LAST_VALUES}
    columns = {key: numbers(epochs, key) for key in NUMBER_COLUMNS}
    results = []
    for index, run in enumerate(runs):
        reported = set(run.metrics.schema.names)
        rows = slice(ends[index] - counts[index], ends[index])
        own = {k: column[rows] if k in reported else column[:0] for k, column in columns.items()}
        results.append(
            {
                **best_result(own, "best_test_acc" if "best_test_acc" in reported else "test_acc"),
                "best_test_acc_top5": best_finite(own["test_acc_top5"]),
                "final_test_acc": last["test_acc"][index] if "test_acc" in reported else None,
                "final_test_acc_top5": last["test_acc_top5"][index]
                if "test_acc_top5" in reported
                else None,
                "epochs_done": int(counts[index]),
                "teacher_test_acc": last_finite(own["teacher_test_acc"]),
                "diverged": "diverged" in reported and bool(last["diverged"][index]),
            }
        )
    return results


LAST_VALUES = ("test_acc", "test_acc_top5", "diverged")
NUMBER_COLUMNS = ("epoch", "best_test_acc", "test_acc", "test_acc_top5", "teacher_test_acc")


def best_result(columns: dict[str, np.ndarray], key: str) -> dict[str, Any]:
    """The best finite value of a run's `key` column and the epoch of its first occurrence."""
    values = columns[key]
    if not np.isfinite(values).any():
        return {"best_test_acc": None, "best_epoch": None}
    at = int(np.nanargmax(np.where(np.isfinite(values), values, np.nan)))
    return {"best_test_acc": float(values[at]), "best_epoch": int(columns["epoch"][at])}


def best_finite(values: np.ndarray) -> float | None:
    """The largest finite value; None without one."""
    finite = values[np.isfinite(values)]
    return float(finite.max()) if len(finite) else None


def last_finite(values: np.ndarray) -> float | None:
    """The last finite value; None without one."""
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if len(finite) else None


def last_values(epochs: pa.Table, key: str, rows: np.ndarray, counts: np.ndarray) -> list[Any]:
    """A column's value in each run's last row (`rows`; None for a run without rows)."""
    if key not in epochs.schema.names:
        return [None] * len(rows)
    values = epochs.column(key).take(np.where(counts > 0, rows, 0)).to_pylist()
    return [value if count else None for value, count in zip(values, counts)]


def numbers(epochs: pa.Table, key: str) -> np.ndarray:
    """A column as floats (nulls as NaN); no such column: no values."""
    if key not in epochs.schema.names:
        return np.array([], dtype=float)
    return np.asarray(epochs.column(key).to_numpy(zero_copy_only=False), dtype=float)


def trial_status(run: TrialRun, epochs_done: int, diverged: bool) -> str:
    """completed, diverged, error, running or pending: the rules are in the module docstring."""
    finished = run.epochs_planned is not None and epochs_done >= run.epochs_planned
    if run.state == "ERROR" or (run.error and run.state is None and not finished):
        return "error"
    if diverged:
        return "diverged"
    if finished or run.state == "TERMINATED":
        return "completed"
    if epochs_done == 0 and (run.folder is None or run.state == "PENDING"):
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
