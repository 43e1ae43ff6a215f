"""A sweep's results: every trial to parquet, mean ± std per grid cell, plots, published numbers.

    python -m tune_kd.analysis EXPERIMENT_DIR [--out DIR] [--metric best|last]

reads a Tune experiment (finished, still running or interrupted; a local folder or a storage URI)
and writes into EXPERIMENT_DIR/results/: `trials.parquet` (one row per planned trial),
`epochs.parquet` (one row per trial and epoch), `summary.md`/`.csv`/`.tex` (one row per grid
cell) and the plots as PNG and SVG. The sweep calls `write_report` when it ends.

The data path: the sweep's plan (`tune_kd_plan.json`: every planned trial and its labels) and Tune's
trial folders (`result.json`: one JSON line per epoch) -> `epochs_frame` and `trials_frame` ->
`summarize` -> tables and plots. A trial's status:

- `pending`: no folder and no entry in Tune's runner state;
- `error`: Tune says ERROR, or (without a runner state) `error.txt` and not all epochs done; its
  last failure's message (from `error.txt`) is in the `error` column and the summary;
- `diverged`: its last result says `diverged`;
- `completed`: every planned epoch done, or Tune says TERMINATED (an ASHA stop included);
- `running`: anything else, also the unfinished trials of an interrupted experiment.

The summary aggregates completed trials only; the others are counted per cell.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.json as pajson
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tune_kd import cli
from tune_kd.storage import PLAN_FILE, Storage

log = logging.getLogger(__name__)

RESULTS_FOLDER = "results"
STATUSES = ("completed", "diverged", "error", "running", "pending")
METRICS = {"best": "best_test_acc", "last": "final_test_acc"}
METRIC_NAMES = {
    "best": "best test accuracy (%)",
    "last": "final-epoch test accuracy (%)",
    "top5": "final-epoch top-5 test accuracy (%)",
}
BEST_MARK, INCOMPLETE_MARK = "★", "†"
LEGEND = f"{BEST_MARK} best cell; {INCOMPLETE_MARK} fewer trials finished than planned"

# Keys of the published tables that a plan's labels may lack, each read from the trial's
# configuration where the label it depends on is set (no projector: no design, and so on).
CONTEXT_KEYS = {"projector_design": "projector", "teacher_correct_only": "teacher"}
MATCH_KEYS = (
    "teacher",
    "student",
    "method",
    "loss",
    "projector",
    "projector_design",
    "teacher_correct_only",
    "lr",
)
# What Tune adds to each result line; `time_total_s` stays: the trial's wall time at that epoch.
TUNE_KEYS = frozenset(
    {
        "timestamp",
        "checkpoint_dir_name",
        "should_checkpoint",
        "done",
        "training_iteration",
        "trial_id",
        "date",
        "time_this_iter_s",
        "pid",
        "hostname",
        "node_ip",
        "config",
        "time_since_restore",
        "iterations_since_restore",
        "experiment_tag",
        "members",
    }
)
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
PLANNED_FOLDER = re.compile(r"(?:trial|group)_(\d+)")
EMPTY = pa.table({})


class ExperimentError(ValueError):
    """A location that holds no readable tune_kd experiment."""


# ----------------------------------------------------------------------------- reading


@dataclass
class TrialRun:
    """One planned trial as its files left it: labels, what Tune says, and per-epoch metrics."""

    trial_id: str
    labels: dict[str, Any]
    epochs_planned: int | None = None
    folder: str | None = None  # the Tune folder holding it; None: never started
    state: str | None = None  # Tune's status in its runner state, when recorded
    error: str | None = None  # the last failure in its folder's error.txt, if any
    group_size: int = 1  # students trained in the same Ray trial
    wall_seconds: float | None = None  # of its Ray trial
    # one row per epoch: what the trainable reported, and time_total_s
    metrics: pa.Table = field(default_factory=lambda: EMPTY)


@dataclass
class Folder:
    """A Tune trial folder: its file names, readable result lines and parameters."""

    name: str
    files: set[str]
    results: pa.Table
    params: dict[str, Any]
    problems: list[str]
    error: str | None = None  # the last failure's message in error.txt


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


def read_plan(storage: Storage) -> dict[str, Any]:
    if not storage.exists():
        raise ExperimentError(f"no experiment folder at {storage.uri}")
    if not storage.exists(PLAN_FILE):
        raise ExperimentError(
            f"{storage.uri} has no {PLAN_FILE}: not an experiment of python -m tune_kd.run"
        )
    try:
        plan = json.loads(storage.read(PLAN_FILE))
    except ValueError as error:
        raise ExperimentError(f"{storage.uri_of(PLAN_FILE)} is unreadable: {error}") from None
    if not isinstance(plan, dict):
        raise ExperimentError(f"{storage.uri_of(PLAN_FILE)} is not a plan: expected a mapping")
    return plan


def list_entries(storage: Storage, *parts: str) -> dict[str, bool]:
    """Names in a folder, each with whether it is a folder."""
    from pyarrow.fs import FileSelector, FileType

    infos = storage.fs.get_file_info(FileSelector(storage.path(*parts), allow_not_found=True))
    return {i.base_name: i.type == FileType.Directory for i in infos}


def read_states(storage: Storage, files: Sequence[str], problems: list[str]) -> dict[str, dict]:
    """Tune's record of each trial, by folder name, from its latest runner state file."""
    names = [f for f in files if f.startswith("experiment_state-") and f.endswith(".json")]
    if not names:
        return {}
    latest = max(names)
    try:
        states = {}
        for entry in json.loads(storage.read(latest))["trial_data"]:
            trial = json.loads(entry[0] if isinstance(entry, list) else entry)
            states[trial.get("relative_logdir") or f"trial_{trial['trial_id']}"] = trial
        return states
    except (ValueError, KeyError, TypeError, IndexError) as error:
        problems.append(f"{latest} is unreadable ({error!r}): statuses read from the folders")
        return {}


def read_folders(storage: Storage, names: Sequence[str]) -> dict[str, Folder]:
    """Every trial folder, read in parallel: on object storage each read is a round trip."""
    names = [n for n in names if n.startswith(("trial_", "group_"))]
    with ThreadPoolExecutor(max_workers=16) as pool:
        return {f.name: f for f in pool.map(lambda name: read_folder(storage, name), names)}


def read_folder(storage: Storage, name: str) -> Folder:
    files = {n for n, is_dir in list_entries(storage, name).items() if not is_dir}
    results, problems = EMPTY, []
    if "result.json" in files:
        results, bad = parse_results(storage.read(name, "result.json"))
        if bad:
            numbers = ", ".join(map(str, bad))
            problems.append(
                f"{name}/result.json: unreadable line {numbers} skipped (cut mid-write?)"
            )
    params = {}
    if "params.json" in files:
        try:
            params = json.loads(storage.read(name, "params.json"))
        except ValueError:
            problems.append(f"{name}/params.json is unreadable")
    error = None
    if "error.txt" in files:
        error = last_failure(storage.read(name, "error.txt").decode(errors="replace"))
    return Folder(name, files, results, params, problems, error)


EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(?:\([\w.]+\))?: \S.*")


def last_failure(text: str) -> str:
    """The message of the last failure Tune appended to a trial's error.txt: its exception line
    (`RuntimeError: ...`), or the first line of a failure without one (a worker that died)."""
    failure = re.split(r"^Failure # \d+.*$", text, flags=re.MULTILINE)[-1]
    lines = [line.rstrip() for line in failure.splitlines() if line.strip()]
    exceptions = [line for line in lines if EXCEPTION_LINE.fullmatch(line)]  # not indented
    message = exceptions[-1] if exceptions else lines[0].strip() if lines else "unknown error"
    return message if len(message) <= 300 else message[:299] + "…"


def parse_results(data: bytes) -> tuple[pa.Table, list[int]]:
    """Tune's result.json as a table, by pyarrow's reader (fast, and it lets threads run); a file
    it refuses (a line cut mid-write) is read line by line, numbering the lines that fail."""
    options = pajson.ReadOptions(use_threads=False, block_size=len(data) + 1)
    try:
        return pajson.read_json(io.BytesIO(data), read_options=options), []
    except pa.ArrowInvalid:
        rows, bad = parse_lines(data)
        keys = dict.fromkeys(k for row in rows for k in row)
        return pa.table({k: [row.get(k) for row in rows] for k in keys}), bad


def parse_lines(data: bytes) -> tuple[list[dict[str, Any]], list[int]]:
    """The readable JSON objects of a JSON-lines file, and the numbers of the other lines."""
    rows, bad = [], []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad.append(number)
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(number)
    return rows, bad


def planned_runs(
    plan: Mapping[str, Any],
    folders: Mapping[str, Folder],
    states: Mapping[str, dict],
    problems: list[str],
) -> list[TrialRun]:
    """One run per planned trial; `trial_0007`/`group_0007` hold position 7 of the plan's groups."""
    runs = {
        t["index"]: TrialRun(
            f"trial_{t['index']:04d}", trial_labels(t), t.get("config", {}).get("epochs")
        )
        for t in plan["trials"]
    }
    groups = plan.get("groups") or [[index] for index in runs]
    for name in sorted({*folders, *states}):
        match = PLANNED_FOLDER.fullmatch(name)
        if match is None or int(match[1]) >= len(groups):
            problems.append(f"{name} matches no planned trial: ignored")
            continue
        members = [runs[index] for index in groups[int(match[1])]]
        fill_runs(members, folders.get(name), states.get(name))
    return list(runs.values())


def sampled_runs(
    plan: Mapping[str, Any], folders: Mapping[str, Folder], states: Mapping[str, dict]
) -> list[TrialRun]:
    """An Optuna sweep's trials, as its folders and runner state show them; the samples not yet
    drawn are pending."""
    base = plan.get("base", {})
    epochs = base.get("epochs") if isinstance(base.get("epochs"), int) else None
    fixed = plan.get("base_labels", {})
    runs = []
    for name in sorted({*folders, *states}):
        folder = folders.get(name)
        params = (folder.params if folder else {}) or states.get(name, {}).get("config", {})
        labels = trial_labels({"labels": {**fixed, **params}, "config": base})
        run = TrialRun(name, labels, epochs)
        fill_runs([run], folder, states.get(name))
        runs.append(run)
    waiting = trial_labels({"labels": dict(fixed), "config": base})
    count = int(plan.get("planned") or 0)
    runs += [TrialRun(f"sample_{i:04d}", dict(waiting), epochs) for i in range(len(runs), count)]
    return runs


def trial_labels(trial: Mapping[str, Any]) -> dict[str, Any]:
    """The plan's labels (a list or mapping as its JSON text), plus the context keys they lack."""
    labels = {
        k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in trial["labels"].items()
    }
    config = trial.get("config", {})
    for key, needs in CONTEXT_KEYS.items():
        if key not in labels:
            labels[key] = config.get(key) if labels.get(needs) is not None else None
    return labels


def fill_runs(runs: Sequence[TrialRun], folder: Folder | None, state: Mapping | None) -> None:
    """Attach a Ray trial's folder and Tune status to the planned trials it trained."""
    results = folder.results if folder else EMPTY
    for run in runs:
        run.folder = folder.name if folder else None
        run.state = state.get("status") if state else None
        run.error = folder.error if folder else None
        run.group_size = len(runs)
        run.wall_seconds = last(results, "time_total_s")
        metrics = member_metrics(results, run.trial_id) if len(runs) > 1 else results
        run.metrics = latest_per_epoch(metrics.drop_columns(TUNE_KEYS & set(metrics.column_names)))


def member_metrics(results: pa.Table, trial_id: str) -> pa.Table:
    """One group student's metrics, from its group's lines (`members`, keyed by plan index), each
    with the group's wall time so far."""
    key = str(int(trial_id.removeprefix("trial_")))
    if "members" not in results.column_names:
        return EMPTY
    members = results.column("members").combine_chunks()
    if members.type.get_field_index(key) < 0:
        return EMPTY
    member = members.flatten()[members.type.get_field_index(key)]
    names = [f.name for f in member.type]
    table = pa.Table.from_arrays(
        [*member.flatten(), results.column("time_total_s")], [*names, "time_total_s"]
    )
    return table.filter(member.is_valid())


def latest_per_epoch(metrics: pa.Table) -> pa.Table:
    """An epoch reported twice (a trial retried from an older checkpoint) keeps its last report."""
    if "epoch" not in metrics.column_names or metrics.num_rows < 2:
        return metrics
    epochs = metrics.column("epoch").to_numpy(zero_copy_only=False)
    if (np.diff(epochs) > 0).all():
        return metrics
    last_reports = len(epochs) - 1 - np.unique(epochs[::-1], return_index=True)[1]
    return metrics.take(np.sort(last_reports))


# ----------------------------------------------------------------------------- frames


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
        "final_test_acc": last(metrics, "test_acc"),
        "final_test_acc_top5": last(metrics, "test_acc_top5"),
        "epochs_done": metrics.num_rows,
        "teacher_test_acc": None,
        "diverged": bool(last(metrics, "diverged")),
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


def last(metrics: pa.Table, key: str) -> Any:
    if key not in metrics.column_names or not metrics.num_rows:
        return None
    return metrics.column(key)[-1].as_py()


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


# ----------------------------------------------------------------------------- summary


def label_keys(trials: pd.DataFrame) -> list[str]:
    return [c for c in trials.columns if c not in ("trial_id", "status", *TRIAL_RESULTS)]


def cell_keys(trials: pd.DataFrame) -> list[str]:
    """The columns that name a grid cell: every label but the seed (context keys only where set)."""
    return [
        c
        for c in label_keys(trials)
        if c != "seed" and not (c in CONTEXT_KEYS and trials[c].isna().all())
    ]


def failures(trials: pd.DataFrame) -> list[str]:
    """`trial_0001 (lr=0.05, seed=1): RuntimeError: ...` for every trial that ended in error,
    with the labels that tell the trials apart."""
    keys = [k for k in label_keys(trials) if trials[k].nunique(dropna=False) > 1]
    lines = []
    for row in trials[trials["status"].eq("error")].to_dict("records"):
        labels = ", ".join(f"{k}={text(row[k])}" for k in keys)
        lines.append(row["trial_id"] + (f" ({labels})" if labels else "") + f": {row['error']}")
    return lines


def cell_stats(trials: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per cell: mean, sample std and n of `column` over completed trials; trials planned and in
    each status; mean GPU-hours of the completed trials; the measured teacher accuracy."""
    keys = cell_keys(trials)
    completed = trials["status"].eq("completed")
    frame = trials[keys].assign(  # helper columns start with _: no clash with a label
        _value=trials[column].where(completed),
        _cost=trials["gpu_hours"].where(completed),
        _teacher=trials["teacher_test_acc"],
        **{f"_{status}": trials["status"].eq(status) for status in STATUSES},
    )
    cells = frame.groupby(keys, dropna=False, sort=False).agg(
        mean=("_value", "mean"),
        std=("_value", "std"),
        n=("_value", "count"),
        n_planned=("_value", "size"),
        **{status: (f"_{status}", "sum") for status in STATUSES},
        gpu_hours=("_cost", "mean"),
        teacher_acc=("_teacher", "mean"),
    )
    cells = cells.reset_index()
    cells.insert(cells.columns.get_loc("n_planned") + 1, "incomplete", cells.n < cells.n_planned)
    return cells


def summarize(
    trials: pd.DataFrame, metric: str = "best", published: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One row per grid cell: its keys, mean ± std (ddof=1) and n of the metric (`best`: best test
    accuracy over the epochs, the paper's convention; `last`: the final epoch's) over completed
    trials, n planned, trials in each status, an `incomplete` flag, mean GPU-hours, the `best`
    cell, the measured teacher, and the published numbers of the same setting where known."""
    cells = cell_stats(trials, METRICS[metric])
    cells["best"] = False
    if cells["mean"].notna().any():
        cells.loc[cells["mean"].idxmax(), "best"] = True
    return with_published(cells, published_numbers() if published is None else published)


def with_published(cells: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    rows = published.to_dict("records")
    matches = [published_for(cell, rows) for cell in cells.to_dict("records")]
    extra = pd.DataFrame(matches, index=cells.index, columns=PUBLISHED_COLUMNS)
    return pd.concat([cells, extra.astype(PUBLISHED_COLUMNS)], axis=1)


PUBLISHED_COLUMNS = {
    "published_teacher": "float64",
    "published_mean": "float64",
    "published_std": "float64",
    "published_n": "Int64",
    "published_source": object,
    "baseline_mean": "float64",
    "baseline_std": "float64",
}


def published_numbers() -> pd.DataFrame:
    """The paper's Tables 1, 2 and 5 and the study's tables (`tune_kd/published.csv`); keys a row
    does not constrain are null."""
    text = resources.files("tune_kd").joinpath("published.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    frame = pd.DataFrame(rows).replace("", None)
    frame["teacher_correct_only"] = frame["teacher_correct_only"].map(
        {"true": True, "false": False}, na_action="ignore"
    )
    for key in ("lr", "mean", "std"):
        frame[key] = pd.to_numeric(frame[key])
    frame["n"] = pd.to_numeric(frame["n"]).astype("Int64")
    return frame


def published_for(cell: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The published teacher, the number of the same setting and the paper's SimKD of the pair."""
    teacher = first(
        r for r in rows if r["method"] == "teacher" and same(cell.get("teacher"), r["teacher"])
    )
    match = most_specific(cell, [r for r in rows if r["method"] != "teacher"])
    if match is None and cell.get("method") == "student":  # a teacher architecture trained alone
        match = first(
            r for r in rows if r["method"] == "teacher" and same(cell.get("student"), r["teacher"])
        )
    baseline = paper_simkd(rows, cell.get("teacher"), cell.get("student"))
    return {
        "published_teacher": teacher["mean"] if teacher else None,
        "published_mean": match["mean"] if match else None,
        "published_std": match["std"] if match else None,
        "published_n": match["n"] if match else None,
        "published_source": f"{match['source']} {match['table']}" if match else None,
        "baseline_mean": baseline["mean"] if baseline else None,
        "baseline_std": baseline["std"] if baseline else None,
    }


def most_specific(cell: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> Any:
    """The row whose every given key the cell shares (keys the cell lacks are not compared) with
    the most keys given; the first of equals."""
    best, best_count = None, -1
    for row in rows:
        given = [k for k in MATCH_KEYS if k in cell and not missing(row[k])]
        if len(given) > best_count and all(same(cell[k], row[k]) for k in given):
            best, best_count = row, len(given)
    return best


def paper_simkd(rows: Sequence[Mapping[str, Any]], teacher: Any, student: Any) -> Any:
    """The paper's SimKD result for a teacher and student (Tables 1 and 2), the study's baseline."""
    return first(
        r
        for r in rows
        if r["source"] == "paper"
        and r["method"] == "simkd"
        and missing(r["projector_design"])
        and same(teacher, r["teacher"])
        and same(student, r["student"])
    )


def first(rows: Iterator[Any]) -> Any:
    return next(rows, None)


def missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def same(value: Any, published: Any) -> bool:
    if missing(value) or missing(published):
        return False
    if isinstance(published, float) and not isinstance(value, str):
        return math.isclose(float(value), published, rel_tol=1e-9)
    return str(value).lower() == str(published).lower()


# ----------------------------------------------------------------------------- text


def summary_keys(summary: pd.DataFrame) -> list[str]:
    return list(summary.columns[: summary.columns.get_loc("mean")])


def format_accuracy(mean: Any, std: Any, n: Any) -> str:
    """`75.43 ± 0.26`; one value `18.36 ± n/a (n=1)`; none `—`."""
    if missing(mean):
        return "—"
    if missing(std):
        return f"{mean:.2f} ± n/a" + ("" if missing(n) else f" (n={n})")
    return f"{mean:.2f} ± {std:.2f}"


def display_table(summary: pd.DataFrame, metric: str = "best") -> pd.DataFrame:
    """The summary as text, one column per thing a reader compares; columns without any known
    value (no published number, no teacher) and the context keys of `shared_line` are left out."""
    rows = [display_row(cell, summary_keys(summary)) for cell in summary.to_dict("records")]
    table = pd.DataFrame(rows).rename(columns={"result": METRIC_NAMES[metric]})
    optional = ["teacher (%)", "published teacher", "published", "vs paper SimKD"]
    unknown = [c for c in optional if table[c].eq("-").all()]
    return table.drop(columns=[*unknown, *shared_context(summary)])


def shared_context(summary: pd.DataFrame) -> dict[str, str]:
    """The context keys with one value in every cell: said once rather than in every row."""
    return {
        key: text(summary[key].iloc[0])
        for key in CONTEXT_KEYS
        if key in summary and summary[key].nunique(dropna=False) == 1
    }


def shared_line(summary: pd.DataFrame) -> str:
    shared = ", ".join(f"{k}={v}" for k, v in shared_context(summary).items())
    return f"in every cell: {shared}" if shared else ""


def display_row(cell: Mapping[str, Any], keys: Sequence[str]) -> dict[str, str]:
    result = format_accuracy(cell["mean"], cell["std"], cell["n"])
    published = format_accuracy(cell["published_mean"], cell["published_std"], cell["published_n"])
    gap = cell["mean"] - cell["baseline_mean"]
    return {
        **{key: text(cell[key]) for key in keys},
        "result": result + (f" {BEST_MARK}" if cell["best"] else ""),
        "n": f"{cell['n']}/{cell['n_planned']}"
        + (f" {INCOMPLETE_MARK}" if cell["incomplete"] else ""),
        "not finished": ", ".join(f"{cell[s]} {s}" for s in STATUSES[1:] if cell[s]) or "-",
        "GPU-h": text(cell["gpu_hours"], ".2f"),
        "teacher (%)": text(cell["teacher_acc"], ".2f"),
        "published teacher": text(cell["published_teacher"], ".2f"),
        "published": "-" if published == "—" else f"{published} ({cell['published_source']})",
        "vs paper SimKD": text(gap, "+.2f"),
    }


def text(value: Any, spec: str = "") -> str:
    if missing(value):
        return "-"
    if spec:
        return format(value, spec)
    return f"{value:g}" if isinstance(value, float) else str(value)


def status_line(summary: pd.DataFrame) -> str:
    counts = ", ".join(f"{int(summary[s].sum())} {s}" for s in STATUSES)
    return f"trials: {int(summary['n_planned'].sum())} planned: {counts}"


def aligned(table: pd.DataFrame) -> str:
    """A fixed-width text table, left-aligned."""
    widths = [max(len(str(c)), *(len(v) for v in table[c])) for c in table.columns]
    lines = [[str(c) for c in table.columns], *table.itertuples(index=False)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)


def format_summary(
    summary: pd.DataFrame,
    metric: str = "best",
    files: Sequence[str] = (),
    failed: Sequence[str] = (),
) -> str:
    """The terminal summary: the cells' table, the trials in each status, the errors of the failed
    ones (`failures`), where the files are."""
    lines = [
        f"{METRIC_NAMES[metric]} per grid cell: mean ± std over completed trials",
        aligned(display_table(summary, metric)),
        LEGEND,
        shared_line(summary),
        status_line(summary),
        *(["failed trials:", *(f"  {line}" for line in failed)] if failed else []),
    ]
    if files:
        folder = files[0].rsplit("/", 1)[0]
        lines.append(f"files in {folder}: " + ", ".join(f.rsplit("/", 1)[-1] for f in files))
    return "\n".join(line for line in lines if line)


def summary_markdown(
    summary: pd.DataFrame,
    metric: str,
    title: str,
    problems: Sequence[str],
    failed: Sequence[str] = (),
) -> str:
    table = display_table(summary, metric)
    rows = [table.columns, *table.itertuples(index=False)]
    lines = ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(table.columns))
    header = [f"# {title}", "", f"{METRIC_NAMES[metric]}: mean ± std over completed trials.", ""]
    notes = [LEGEND + ".", shared_line(summary), status_line(summary) + "."]
    footer = [line for note in notes if note for line in ("", note)]
    listed = ["", "Failed trials:", *(f"- {f}" for f in failed)] if failed else []
    listed += ["", "Problems:", *(f"- {p}" for p in problems)] if problems else []
    return "\n".join(header + lines + footer + listed) + "\n"


TEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "±": r"$\pm$",
    "—": "---",
    "→": r"$\to$",
    BEST_MARK: r"$\star$",
    INCOMPLETE_MARK: r"$^\dagger$",
}


def tex_escape(value: str) -> str:
    return "".join(TEX_ESCAPES.get(char, char) for char in value)


def summary_tex(summary: pd.DataFrame, metric: str) -> str:
    table = display_table(summary, metric)
    rows = [
        " & ".join(tex_escape(str(v)) for v in row) + r" \\"
        for row in table.itertuples(index=False)
    ]
    header = " & ".join(tex_escape(c) for c in table.columns) + r" \\"
    return "\n".join(
        [
            r"\begin{tabular}{" + "l" * len(table.columns) + "}",
            r"\hline",
            header,
            r"\hline",
            *rows,
            r"\hline",
            r"\end{tabular}",
            *(f"% {line}" for line in (LEGEND, shared_line(summary)) if line),
            "",
        ]
    )


# ----------------------------------------------------------------------------- plots


def groups_of(
    frame: pd.DataFrame, keys: Sequence[str], default: str
) -> list[tuple[str, pd.DataFrame]]:
    """`frame` split by the `keys` that vary in it, each part labelled `key=value, ...`."""
    varying = [k for k in keys if frame[k].nunique(dropna=False) > 1]
    if not varying:
        return [(default, frame)]
    parts = frame.groupby(varying, dropna=False, sort=False)
    return [
        (", ".join(f"{k}={text(v)}" for k, v in zip(varying, values)), part)
        for values, part in parts
    ]


def pair_name(frame: pd.DataFrame) -> str:
    """`teacher → student, method` of a frame holding one such combination."""
    first_row = frame.iloc[0]
    teacher = "" if missing(first_row["teacher"]) else f"{first_row['teacher']} → "
    return f"{teacher}{first_row['student']}, {first_row['method']}"


def plot_accuracy_vs_lr(
    trials: pd.DataFrame, metric: str = "best", published: pd.DataFrame | None = None
) -> Figure | None:
    """Accuracy against learning rate per cell (mean ± std), one line per other distinguishing
    key, the teacher and the paper's SimKD as horizontal lines; None without an lr axis."""
    cells = summarize(trials, metric, published)
    title = f"Student {METRIC_NAMES[metric].removesuffix(' (%)')} against learning rate"
    fig = lr_figure(cells, METRIC_NAMES[metric], title)
    if fig is not None:
        reference_lines(fig.axes[0], cells)
        fig.axes[0].legend(fontsize="small")
    return fig


def plot_top5_vs_lr(trials: pd.DataFrame) -> Figure | None:
    """Final-epoch top-5 accuracy against learning rate per cell; None without an lr axis."""
    cells = cell_stats(trials, "final_test_acc_top5")
    fig = lr_figure(
        cells, METRIC_NAMES["top5"], "Student top-5 test accuracy against learning rate"
    )
    if fig is not None:
        fig.axes[0].legend(fontsize="small")
    return fig


def lr_figure(cells: pd.DataFrame, ylabel: str, title: str) -> Figure | None:
    cells = cells[cells["n"] > 0]
    if "lr" not in cells or cells["lr"].nunique() < 2:
        return None
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    keys = [k for k in summary_keys(cells) if k != "lr"]
    for label, line in groups_of(cells, keys, default=pair_name(cells)):
        line = line.sort_values("lr")
        yerr = line["std"].fillna(0)
        ax.errorbar(line["lr"], line["mean"], yerr=yerr, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    rates = sorted(cells["lr"].dropna().unique())
    ax.set_xticks(rates, [f"{lr:g}" for lr in rates])
    ax.minorticks_off()
    ax.set_xlabel("initial learning rate (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title + "\n(mean ± std over seeds; a point without a bar had one finished trial)")
    ax.grid(alpha=0.3)
    return fig


def reference_lines(ax: Axes, cells: pd.DataFrame) -> None:
    """The teacher (measured, else published) and the paper's SimKD of each teacher/student pair."""
    for (teacher, student), pair in cells.groupby(["teacher", "student"], sort=False):
        measured = pair["teacher_acc"].mean()
        source = "paper" if missing(measured) else "measured"
        value = pair["published_teacher"].iloc[0] if missing(measured) else measured
        if not missing(value):
            label = f"teacher {teacher} ({source}): {value:.2f}"
            ax.axhline(value, color="black", linestyle=":", label=label)
        baseline, std = pair["baseline_mean"].iloc[0], pair["baseline_std"].iloc[0]
        if not missing(baseline):
            label = f"paper SimKD {teacher} → {student}: {format_accuracy(baseline, std, None)}"
            ax.axhline(baseline, color="gray", linestyle="--", label=label)


CURVE_LABELS = {
    "test_acc": ("test accuracy (%)", "Test accuracy per epoch"),
    "test_loss": ("test loss (cross-entropy)", "Test loss per epoch"),
}


def plot_curves(
    epochs: pd.DataFrame, trials: pd.DataFrame, column: str = "test_acc"
) -> Figure | None:
    """`column` per epoch, mean line with a ± std band over the completed and running trials of a
    cell: one line per learning rate, one panel per other distinguishing key; None without data."""
    if column not in epochs:
        return None
    keys = cell_keys(trials)
    ran = trials.loc[trials["status"].isin(["completed", "running"]), ["trial_id", *keys]]
    data = epochs[["trial_id", "epoch", column]].merge(ran, on="trial_id")
    if data.empty:
        return None
    panels = groups_of(data, [k for k in keys if k != "lr"], default=pair_name(data))
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(5 * columns, 3.8 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False).ravel()
    ylabel, title = CURVE_LABELS.get(column, (column, column))
    for ax, (name, panel) in zip(axes, panels):
        curve_panel(ax, panel, column, name)
        ax.set_ylabel(ylabel)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(f"{title} (mean line, ± std band over seeds)")
    return fig


def curve_panel(ax: Axes, panel: pd.DataFrame, column: str, name: str) -> None:
    for lr, runs in (
        panel.groupby("lr", dropna=False, sort=True) if "lr" in panel else [(None, panel)]
    ):
        stats = runs.groupby("epoch")[column].agg(["mean", "std"])
        label = "default lr" if missing(lr) else f"lr={lr:g}"
        (line,) = ax.plot(stats.index, stats["mean"], label=label)
        low, high = stats["mean"] - stats["std"], stats["mean"] + stats["std"]
        ax.fill_between(stats.index, low, high, color=line.get_color(), alpha=0.2)
    ax.set_title(name, fontsize="medium")
    ax.set_xlabel("epoch")
    ax.tick_params(labelbottom=True)  # also above an empty slot of the grid
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot_accuracy_vs_gpu_hours(trials: pd.DataFrame, metric: str = "best") -> Figure | None:
    """Each cell's accuracy (mean ± std) against its mean GPU-hours per trial: what a variant
    costs. None when no trial used a GPU."""
    cells = cell_stats(trials, METRICS[metric])
    cells = cells[(cells["n"] > 0) & (cells["gpu_hours"] > 0)]
    if cells.empty:
        return None
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    keys = [k for k in summary_keys(cells) if k != "lr"]
    for label, part in groups_of(cells, keys, default=pair_name(cells)):
        ax.errorbar(
            part["gpu_hours"],
            part["mean"],
            yerr=part["std"].fillna(0),
            fmt="o",
            capsize=3,
            label=label,
        )
        if "lr" in part and part["lr"].notna().any():
            for x, y, lr in zip(part["gpu_hours"], part["mean"], part["lr"]):
                ax.annotate(
                    f"lr={text(lr)}",
                    (x, y),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize="x-small",
                )
    ax.set_xlabel("GPU-hours per trial (mean over the cell's completed trials)")
    ax.set_ylabel(METRIC_NAMES[metric])
    ax.set_title("Accuracy against cost per grid cell (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def figures(experiment: Experiment, metric: str = "best") -> dict[str, Figure]:
    """Every plot the experiment has data for, by file name."""
    made = {
        "accuracy_vs_lr": plot_accuracy_vs_lr(experiment.trials, metric),
        "test_acc_curves": plot_curves(experiment.epochs, experiment.trials, "test_acc"),
        "test_loss_curves": plot_curves(experiment.epochs, experiment.trials, "test_loss"),
        "top5_vs_lr": plot_top5_vs_lr(experiment.trials),
        "accuracy_vs_gpu_hours": plot_accuracy_vs_gpu_hours(experiment.trials, metric),
    }
    return {name: fig for name, fig in made.items() if fig is not None}


# ----------------------------------------------------------------------------- report


@dataclass
class Report:
    experiment: Experiment
    summary: pd.DataFrame
    metric: str
    files: list[str]  # what was written, as paths or URIs

    @property
    def failures(self) -> list[str]:
        return failures(self.experiment.trials)


def write_report(location: str, out: str | None = None, metric: str = "best") -> Report:
    """Read the experiment at `location` and write every table and plot into `out` (default
    `location/results`): the sweep calls this at its end."""
    experiment = load_experiment(location)
    summary = summarize(experiment.trials, metric)
    target = out if out is not None else Storage(str(location)).uri_of(RESULTS_FOLDER)
    return Report(experiment, summary, metric, write_files(experiment, summary, metric, target))


def write_files(experiment: Experiment, summary: pd.DataFrame, metric: str, out: str) -> list[str]:
    """Both frames as parquet, the summary as markdown, CSV and LaTeX, every plot as PNG and SVG;
    returns where each file went."""
    target = Storage(str(out))
    unwritable = target.unwritable()
    if unwritable:
        raise ExperimentError(unwritable)
    contents = {
        "trials.parquet": parquet_bytes(experiment.trials),
        "epochs.parquet": parquet_bytes(experiment.epochs),
        "summary.md": summary_markdown(
            summary, metric, experiment.name, experiment.problems, failures(experiment.trials)
        ),
        "summary.csv": summary.to_csv(index=False),
        "summary.tex": summary_tex(summary, metric),
    }
    for name, fig in figures(experiment, metric).items():
        contents[f"{name}.png"] = figure_bytes(fig, "png")
        contents[f"{name}.svg"] = figure_bytes(fig, "svg")
    for name, content in contents.items():  # each file whole: an interruption keeps the old one
        target.write(content.encode() if isinstance(content, str) else content, name)
    return [target.uri_of(name) for name in contents]


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def figure_bytes(fig: Figure, kind: str) -> bytes:
    buffer = io.BytesIO()
    metadata = {"Date": None} if kind == "svg" else None  # the same plot gives the same file
    fig.savefig(buffer, format=kind, dpi=120, metadata=metadata)
    return buffer.getvalue()


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m tune_kd.analysis", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "experiment", help="Tune experiment folder or URI (holds tune_kd_plan.json)"
    )
    parser.add_argument("--out", help="where the files go (default EXPERIMENT/results)")
    parser.add_argument(
        "--metric",
        choices=list(METRICS),
        default="best",
        help="best: best test accuracy over the epochs (the paper's); last: the final epoch's",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        report = write_report(args.experiment, args.out, args.metric)
    except ExperimentError as error:
        return cli.fail(error)
    print(format_summary(report.summary, args.metric, report.files, report.failures))
    return 0
