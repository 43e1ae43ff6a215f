"""Experiment trackers: Ray Tune's own MLflow and Weights & Biases logger callbacks, with one run
per planned trial.

Each planned trial is one tracker run, named as its trial (`trial_0007` for plan index 7; a trial
Optuna sampled keeps Tune's name), also when it trains in a group of students (`group_students`),
which is one Tune trial: `PerPlannedTrial` splits such a trial into its students, each a run of
its own whose metrics are the student's own (the `members/<plan index>/` part of the group's
results). A run's parameters are its plan `index`, its full training configuration, the sweep's
`--set` values and its grid values; its per-epoch results are its metrics; its grid values are
also its tags, with a `cell` tag naming its grid cell (every axis but the seed), so a tracker's
table groups the seeds of a cell.

Both trackers are configured by their own environment variables: MLflow by
`MLFLOW_TRACKING_URI` (a tracking server, or a local store), W&B by `WANDB_API_KEY` or
`wandb login`, `WANDB_PROJECT` (default `tune-kd`) and `WANDB_MODE=offline`. Every sweep is an
MLflow experiment, and a W&B group, of its experiment's name. `setup_problem` checks that a
tracker can start (MLflow: its store answers; W&B: a key, unless offline) before a sweep writes
or starts anything.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.air.integrations.wandb import WandbLoggerCallback

from tune_kd import plan
from tune_kd.cli import first_line

DEFAULT_WANDB_PROJECT = "tune-kd"

# How long the check that MLflow's tracking server answers waits, in seconds (one try).
MLFLOW_CHECK_TIMEOUT = 5


def axis_tags(config: Mapping[str, Any], axes: Sequence[str]) -> dict[str, str]:
    """The grid values of a trial's configuration as tags, and its cell (every axis but seed)."""
    tags = {axis: str(config[axis]) for axis in axes if axis in config}
    tags["cell"] = ", ".join(f"{k}={v}" for k, v in tags.items() if k != "seed")
    return tags


@dataclass(eq=False)
class PlannedTrial:
    """One planned trial as Ray's logger callbacks see a Tune trial: an id, a name, a
    configuration (the run's parameters) and a folder. A student of a group is one of its own."""

    trial_id: str
    trial_name: str
    config: dict[str, Any]
    local_path: str
    experiment_dir_name: str
    checkpoint: Any = None  # read by W&B only to upload checkpoints, which it does not here

    def __str__(self) -> str:
        return self.trial_name


class PerPlannedTrial:
    """What makes a Ray logger callback log one run per planned trial: each Tune trial is split
    into its students (`trainable.members_of`), each with its own parameters and, in a group,
    its own part of the group's results.

    `students` holds each planned Tune trial's students as the trainable receives them, `base`
    what Optuna's samples complete, `overrides` the sweep's `--set` values."""

    def __init__(
        self,
        students: Sequence[Sequence[Mapping[str, Any]]],
        base: Mapping[str, Any],
        overrides: Mapping[str, Any],
        axes: Sequence[str],
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.students = [list(group) for group in students]
        self.base = dict(base)
        self.overrides = dict(overrides)
        self.axes = list(axes)
        self._planned: dict[Any, list[tuple[str | None, PlannedTrial]]] = {}

    def planned_trials(self, trial: Any) -> list[tuple[str | None, PlannedTrial]]:
        """The planned trials of a Tune trial, each with its key in a group's `members`."""
        if trial not in self._planned:
            from tune_kd.trainable import members_of

            members = members_of(trial.config, self.students, self.base)
            self._planned[trial] = [
                (
                    None if m["index"] is None else plan.member_key(m["index"]),
                    self.planned_trial(trial, m, alone=len(members) == 1),
                )
                for m in members
            ]
        return self._planned[trial]

    def planned_trial(self, trial: Any, member: Mapping[str, Any], alone: bool) -> PlannedTrial:
        params = {**self.overrides, **member["config"], **member["axes"]}
        if member["index"] is not None:
            params = {"index": member["index"], **params}
        if alone:
            trial_id, name = trial.trial_id, str(trial)
        else:
            trial_id = f"{trial.trial_id}-{member['index']}"
            name = plan.trial_folder_name(member["index"], grouped=False)
        return PlannedTrial(trial_id, name, params, trial.local_path, trial.experiment_dir_name)

    def log_trial_start(self, trial: Any) -> None:
        if isinstance(trial, PlannedTrial):  # W&B starts a run on its first result
            self.start_run(trial)
            return
        for _, planned in self.planned_trials(trial):
            self.start_run(planned)

    def start_run(self, planned: PlannedTrial) -> None:
        """Start the tracker's run of one planned trial."""
        super().log_trial_start(planned)

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        members = result.get(plan.MEMBERS)
        shared = {k: v for k, v in result.items() if k not in (plan.MEMBERS, "config")}
        for key, planned in self.planned_trials(trial):
            own = {} if members is None else members.get(key)
            if own is not None:  # a group's student that stopped (diverged) reports no more
                super().log_trial_result(iteration, planned, {**shared, **own})

    def log_trial_save(self, trial: Any) -> None:
        for _, planned in self.planned_trials(trial):
            super().log_trial_save(planned)

    def log_trial_restore(self, trial: Any) -> None:
        for _, planned in self.planned_trials(trial):
            super().log_trial_restore(planned)

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        for _, planned in self.planned_trials(trial):
            super().log_trial_end(planned, failed=failed)


class MLflowCallback(PerPlannedTrial, MLflowLoggerCallback):
    """Ray's MLflow logger: one run per planned trial, tagged with its grid values."""

    def start_run(self, planned: PlannedTrial) -> None:
        common = self.tags
        self.tags = {**common, **axis_tags(planned.config, self.axes)}
        try:
            super().start_run(planned)
        finally:
            self.tags = common


class WandbCallback(PerPlannedTrial, WandbLoggerCallback):
    """Ray's W&B logger: one run per planned trial, tagged `axis=value` for its grid values."""

    def start_run(self, planned: PlannedTrial) -> None:
        common = self.kwargs
        tags = axis_tags(planned.config, self.axes)
        self.kwargs = {**common, "tags": [f"{k}={v}" for k, v in tags.items() if k != "cell"]}
        try:
            super().start_run(planned)
        finally:
            self.kwargs = common


# ----------------------------------------------------------------------------- before a sweep


def setup_problem(tracker: str) -> str | None:
    """What keeps `tracker` from starting here (its package, its settings, its store), naming the
    setting to change; None when it can start. Writes nothing but what MLflow's client writes
    to open a local store."""
    package = {"mlflow": "mlflow", "wandb": "wandb"}[tracker]
    if importlib.util.find_spec(package) is None:
        return f"{tracker} is not installed: pip install -e '.[{tracker}]'"
    return mlflow_problem() if tracker == "mlflow" else wandb_problem()


def mlflow_problem() -> str | None:
    """Whether MLflow's tracking store at MLFLOW_TRACKING_URI answers (one try, a short wait)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return "mlflow needs MLFLOW_TRACKING_URI: your tracking server, or a local store"
    import mlflow

    with environment(
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(MLFLOW_CHECK_TIMEOUT)
    ):
        try:
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
        except Exception as error:  # any store's own: a refused file store, no server, ...
            return f"mlflow cannot use MLFLOW_TRACKING_URI={uri}: {first_line(error)}"
    return None


def wandb_problem() -> str | None:
    """Whether W&B has what it needs to log: an API key, unless it runs offline."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled") or os.environ.get("WANDB_API_KEY"):
        return None
    import wandb

    if not wandb.login(prompt=False, verify=False):  # `wandb login`'s saved key, if any
        return "wandb needs WANDB_API_KEY or `wandb login` (or WANDB_MODE=offline)"
    return None


@contextlib.contextmanager
def environment(**variables: str) -> Iterator[None]:
    """Set environment variables for the time of a `with` block."""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def callbacks(
    trackers: Sequence[str],
    axes: Sequence[str],
    experiment: str,
    students: Sequence[Sequence[Mapping[str, Any]]],
    base: Mapping[str, Any],
    overrides: Mapping[str, Any],
) -> list[Any]:
    """The logger callbacks of `trackers` for the Tune experiment `experiment` (see
    `PerPlannedTrial` for `students`, `base` and `overrides`)."""
    plan_of = {"students": students, "base": base, "overrides": overrides, "axes": axes}
    made: list[Any] = []
    if "mlflow" in trackers:
        made.append(MLflowCallback(**plan_of, experiment_name=experiment))
    if "wandb" in trackers:
        project = os.environ.get("WANDB_PROJECT") or DEFAULT_WANDB_PROJECT
        made.append(WandbCallback(**plan_of, project=project, group=experiment))
    return made
