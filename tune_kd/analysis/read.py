"""Reading a Tune experiment's files: the sweep's plan, Tune's runner state and its trial folders
(`result.json`: one JSON line per epoch, `params.json`, `error.txt`).

What the sweep writes and this module reads back, the plan file, the names of the trial folders
and a group's per-student results, is defined once in `tune_kd.plan`."""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson
from pyarrow.fs import FileInfo, FileSelector, FileType

from tune_kd import plan
from tune_kd.storage import Storage

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
        plan.MEMBERS,
    }
)
EMPTY = pa.table({})


class ExperimentError(ValueError):
    """A location that holds no readable tune_kd experiment."""


@dataclass
class Parsed:
    """A trial's result.json as read: its size and modification time then, its readable lines
    as a table (Tune's keys left out, `members` and `time_total_s` kept) and the numbers of its
    unreadable lines."""

    size: int
    mtime_ns: int | None  # None where the storage does not say
    results: pa.Table
    bad: list[int]


@dataclass
class Folder:
    """A Tune trial folder: its file names, readable result lines and parameters."""

    name: str
    files: set[str]
    results: pa.Table  # as in Parsed
    params: dict[str, Any]
    problems: list[str]
    error: str | None = None  # the last failure's message in error.txt
    parsed: Parsed | None = None  # its result.json, when it has one


def read_plan(storage: Storage) -> dict[str, Any]:
    """The sweep's plan; ExperimentError when the folder or its plan is missing or unreadable."""
    try:
        return plan.read_plan(storage)
    except plan.PlanError as error:
        raise ExperimentError(str(error)) from None


def list_entries(storage: Storage, *parts: str) -> dict[str, FileInfo]:
    """What a folder holds, by name."""
    infos = storage.fs.get_file_info(FileSelector(storage.path(*parts), allow_not_found=True))
    return {i.base_name: i for i in infos}


def is_folder(info: FileInfo) -> bool:
    return info.type == FileType.Directory


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
            name = trial.get("relative_logdir") or plan.sampled_folder_name(trial["trial_id"])
            states[name] = trial
        return states
    except (ValueError, KeyError, TypeError, IndexError) as error:
        problems.append(f"{latest} is unreadable ({error!r}): statuses read from the folders")
        return {}


def read_folders(
    storage: Storage, names: Sequence[str], earlier: Mapping[str, Parsed]
) -> dict[str, Folder]:
    """Every trial folder, read in parallel: on object storage each read is a round trip, a local
    folder's reads are quick and parsing its result.json takes the time (one thread per core).
    A result.json of the size and modification time of its `earlier` parse is not parsed again."""
    names = [n for n in names if n.startswith(plan.FOLDER_PREFIXES)]
    workers = min(16, os.cpu_count() or 1) if storage.local else 16
    with ThreadPoolExecutor(max_workers=workers) as pool:
        read = pool.map(lambda name: read_folder(storage, name, earlier.get(name)), names)
        return {f.name: f for f in read}


def read_folder(storage: Storage, name: str, earlier: Parsed | None = None) -> Folder:
    """One trial folder; an unreadable file is a problem, never an exception. Its result.json is
    `earlier`'s table where its size and modification time are `earlier`'s."""
    entries = list_entries(storage, name)
    files = {n for n, info in entries.items() if not is_folder(info)}
    results, problems, parsed = EMPTY, [], None
    if "result.json" in files:
        info = entries["result.json"]
        parsed = earlier
        if parsed is None or (parsed.size, parsed.mtime_ns) != (info.size, info.mtime_ns):
            parsed = parse_file(storage, name, info)
        results = parsed.results
        if parsed.bad:
            numbers = ", ".join(map(str, parsed.bad))
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
    return Folder(name, files, results, params, problems, error, parsed)


def parse_file(storage: Storage, name: str, info: FileInfo) -> Parsed:
    """A trial's result.json parsed, with the size and modification time listed in `info` (a
    file that grows while it is read is parsed again next time)."""
    results, bad = parse_results(storage.read(name, "result.json"))
    dropped = (TUNE_KEYS - {plan.MEMBERS}) & set(results.schema.names)
    return Parsed(info.size, info.mtime_ns, results.drop_columns(list(dropped)), bad)


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


def member_metrics(results: pa.Table, trial_id: str) -> pa.Table:
    """One group student's metrics, from its group's lines (`members`, keyed by plan index), each
    with the group's wall time so far."""
    key = plan.member_key(int(trial_id.removeprefix(plan.TRIAL_PREFIX)))
    if plan.MEMBERS not in results.schema.names:
        return EMPTY
    members = results.column(plan.MEMBERS).combine_chunks()
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
    if "epoch" not in metrics.schema.names or metrics.num_rows < 2:
        return metrics
    epochs = metrics.column("epoch").to_numpy(zero_copy_only=False)
    if (np.diff(epochs) > 0).all():
        return metrics
    last_reports = len(epochs) - 1 - np.unique(epochs[::-1], return_index=True)[1]
    return metrics.take(np.sort(last_reports))
