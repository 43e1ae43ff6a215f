"""What a sweep writes and its readers read back: the plan file, trial folder names, and a group's
per-student results. The sweep writes them (the plan before its first trial, the folders through
Tune's trial names, the results from each trial); `--resume` and the results' tables read them.

The plan, `tune_kd_plan.json` beside Tune's files of an experiment, lists every planned trial so
that none is ever silently lost. Its keys: `name`, `resources` ({cpu, gpu} per trial),
`space_file`, `space_text` and `overrides` (what --resume reloads), `planned` (the trial count),
`axes`, `metric`, `groups` (plan indices per Ray trial, in order), `trials` (each planned trial's
index, axes, labels and config: a grid's, empty for an Optuna search), and for an Optuna search
`base` and `base_labels` (the configuration and labels its samples complete; empty for a grid).

A Ray trial's folder is `trial_0007` for plan index 7 run alone, `group_0002` for position 2 of
the plan's groups, and `trial_<Tune's id>` for a trial Optuna sampled.

A group's Tune result holds each student's metrics under `members`, keyed by plan index (as text),
with the group's epoch and best accuracies on top for the progress table and the scheduler.

This module imports nothing heavier than the standard library, so every reader can import it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tune_kd.space import Resources, Space
    from tune_kd.storage import Storage

PLAN_FILE = "tune_kd_plan.json"

TRIAL_PREFIX, GROUP_PREFIX = "trial_", "group_"
FOLDER_PREFIXES = (TRIAL_PREFIX, GROUP_PREFIX)  # every Ray trial's folder, planned or sampled
# A planned Ray trial's folder; its number is the position in the plan's groups.
TRIAL_FOLDER = re.compile(rf"(?:{TRIAL_PREFIX}|{GROUP_PREFIX})(\d+)")

MEMBERS = "members"


class PlanError(ValueError):
    """A plan file that is missing or cannot be read; the message says which and why."""


# ----------------------------------------------------------------------------- the plan file


def write_plan(
    storage: Storage,
    name: str,
    space: Space,
    space_text: str,
    overrides: Mapping[str, Any],
    resources: Resources,
) -> None:
    """The plan of experiment `name` beside Tune's files: every planned trial, so none is ever
    silently lost."""
    optuna = space.search.algorithm == "optuna"
    plan = {
        "name": space.name,
        "resources": dataclasses.asdict(resources),
        "space_file": str(space.path),
        "space_text": space_text,
        "overrides": dict(overrides),
        "planned": space.planned,
        "axes": space.axes,
        "base": space.sampling_base,
        "base_labels": space.trials[0].labels if optuna else {},
        "groups": [[t.index for t in group] for group in space.groups],
        "metric": space.metric,
        "trials": [
            {"index": t.index, "axes": t.axes, "labels": t.labels, "config": t.config.to_dict()}
            for t in space.trials
            if not optuna  # Optuna's trials are sampled as it runs
        ],
    }
    storage.write(json.dumps(plan, indent=1, default=str).encode(), name, PLAN_FILE)


def read_plan(storage: Storage) -> dict[str, Any]:
    """The plan of the experiment whose folder `storage` is; PlanError when the folder, or its
    plan, is missing or unreadable."""
    if not storage.exists():
        raise PlanError(f"no experiment folder at {storage.uri}")
    if not storage.exists(PLAN_FILE):
        raise PlanError(
            f"{storage.uri} has no {PLAN_FILE}: not an experiment of python -m tune_kd.run"
        )
    try:
        plan = json.loads(storage.read(PLAN_FILE))
    except ValueError as error:
        raise PlanError(f"{storage.uri_of(PLAN_FILE)} is unreadable: {error}") from None
    if not isinstance(plan, dict):
        raise PlanError(f"{storage.uri_of(PLAN_FILE)} is not a plan: expected a mapping")
    return plan


def planned_space(storage: Storage, name: str) -> tuple[str, dict[str, Any]]:
    """The space file's text and the overrides experiment `name` was planned with (for
    --resume); PlanError when its plan cannot be read for them."""
    try:
        plan = json.loads(storage.read(name, PLAN_FILE))
        return plan["space_text"], plan["overrides"]
    except (ValueError, TypeError, KeyError) as error:
        where = storage.uri_of(name, PLAN_FILE)
        raise PlanError(f"{where} is not a readable plan ({error!r})") from None


def has_plan(storage: Storage, name: str) -> bool:
    """Whether the storage holds an experiment `name` written by the sweep."""
    return storage.exists(name, PLAN_FILE)


# ----------------------------------------------------------------------------- trial folders


def trial_folder_name(position: int, grouped: bool) -> str:
    """The folder of the planned Ray trial at `position` of the plan's groups: `group_<position>`
    for a group of students, else `trial_<position>` (a trial run alone, whose position is its
    plan index)."""
    return f"{GROUP_PREFIX if grouped else TRIAL_PREFIX}{position:04d}"


def sampled_folder_name(trial_id: str) -> str:
    """The folder of a trial Optuna sampled: Tune's id for it."""
    return f"{TRIAL_PREFIX}{trial_id}"


# ----------------------------------------------------------------------------- group results


def member_key(index: int) -> str:
    """The key of plan index `index` in a group's `members`."""
    return str(index)


def group_result(rows: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """One Tune result of a group from its students' metrics of an epoch, by plan index (the
    students that reported): each under `members`, and the group's epoch and best accuracies on
    top."""
    members = {member_key(index): row for index, row in rows.items()}
    reported = list(members.values())
    return {
        "epoch": reported[0]["epoch"],
        "test_acc": max(r["test_acc"] for r in reported),
        "best_test_acc": max(r["best_test_acc"] for r in reported),
        "test_acc_top5": max(r["test_acc_top5"] for r in reported),
        MEMBERS: members,
    }
