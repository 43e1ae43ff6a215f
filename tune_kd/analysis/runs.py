"""Which planned trial each Tune folder holds: the plan's trials (or an Optuna sweep's samples)
with their labels, folders, Tune statuses and per-epoch metrics."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from tune_kd.analysis.read import (
    EMPTY,
    TUNE_KEYS,
    Folder,
    latest_per_epoch,
    member_metrics,
)
from tune_kd.plan import TRIAL_FOLDER, trial_folder_name

# Keys of the published tables that a plan's labels may lack, each read from the trial's
# configuration where the label it depends on is set (no projector: no design, and so on).
CONTEXT_KEYS = {"projector_design": "projector", "teacher_correct_only": "teacher"}


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


def planned_runs(
    plan: Mapping[str, Any],
    folders: Mapping[str, Folder],
    states: Mapping[str, dict],
    problems: list[str],
) -> list[TrialRun]:
    """One run per planned trial; `trial_0007`/`group_0007` hold position 7 of the plan's groups."""
    runs = {
        t["index"]: TrialRun(
            trial_folder_name(t["index"], grouped=False),
            trial_labels(t),
            t.get("config", {}).get("epochs"),
        )
        for t in plan["trials"]
    }
    for index, ratio in pruning_ratios(plan["trials"]).items():
        runs[index].labels["pruning_ratio"] = ratio
    groups = plan.get("groups") or [[index] for index in runs]
    for name in sorted({*folders, *states}):
        match = TRIAL_FOLDER.fullmatch(name)
        if match is None or int(match[1]) >= len(groups):
            problems.append(f"{name} matches no planned trial: ignored")
            continue
        members = [runs[index] for index in groups[int(match[1])]]
        fill_runs(members, folders.get(name), states.get(name))
    return list(runs.values())


def pruning_ratios(trials: Sequence[Mapping[str, Any]]) -> dict[int, float | None]:
    """Each planned trial's pruning ratio (`tune_kd.params`, the paper's Figure 6 axis) by its
    index, for plans with `reuse` trials only (empty otherwise); a student trained alone is
    compared with the plan's teacher when it has only one."""
    configs = {t["index"]: t.get("config", {}) for t in trials}
    if not any(c.get("method") == "reuse" for c in configs.values()):
        return {}
    from tune_kd.config import Config  # torch and the models: only for such plans
    from tune_kd.params import deployed

    teachers = {c.get("teacher") for c in configs.values() if c.get("method") != "student"}
    reference = teachers.pop() if len(teachers) == 1 else None

    def ratio(config: Mapping[str, Any]) -> float | None:
        try:
            return deployed(Config.from_dict(config), reference).pruning_ratio
        except ValueError:  # a configuration this version no longer reads: no ratio
            return None

    return {index: ratio(config) for index, config in configs.items()}


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
        run.wall_seconds = last_value(results, "time_total_s")
        metrics = member_metrics(results, run.trial_id) if len(runs) > 1 else results
        run.metrics = latest_per_epoch(metrics.drop_columns(TUNE_KEYS & set(metrics.schema.names)))


def last_value(metrics: pa.Table, key: str) -> Any:
    """The last row's value of a column; None without that column or rows."""
    if key not in metrics.schema.names or not metrics.num_rows:
        return None
    return metrics.column(key)[-1].as_py()
