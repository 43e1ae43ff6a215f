"""Experiment trackers: Ray Tune's own MLflow and Weights & Biases logger callbacks.

Each Tune trial is one tracker run: its configuration holds the trial's grid values (and its plan
`index`), its per-epoch results are the run's metrics, and the grid values are also its tags,
with a `cell` tag naming its grid cell (every axis but the seed), so a tracker's table groups the
seeds of a cell. A group of students trained together (`group_students`) is one Tune trial and so
one run: the axes its students share are its configuration, and each student's metrics are under
`members/<plan index>/`.

Both trackers are configured by their own environment variables: MLflow by
`MLFLOW_TRACKING_URI` (a tracking server, or a local store), W&B by `WANDB_API_KEY` or
`wandb login`, `WANDB_PROJECT` (default `tune-kd`) and `WANDB_MODE=offline`. Every sweep is an
MLflow experiment, and a W&B group, of its experiment's name.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.air.integrations.wandb import WandbLoggerCallback

DEFAULT_WANDB_PROJECT = "tune-kd"


def axis_tags(config: Mapping[str, Any], axes: Sequence[str]) -> dict[str, str]:
    """The grid values of a trial's configuration as tags, and its cell (every axis but seed)."""
    tags = {axis: str(config[axis]) for axis in axes if axis in config}
    tags["cell"] = ", ".join(f"{k}={v}" for k, v in tags.items() if k != "seed")
    return tags


class MLflowCallback(MLflowLoggerCallback):
    """Ray's MLflow logger, with each run tagged with its trial's grid values."""

    def __init__(self, axes: Sequence[str], **kwargs: Any):
        super().__init__(**kwargs)
        self.axes = list(axes)

    def log_trial_start(self, trial: Any) -> None:
        common = self.tags
        self.tags = {**common, **axis_tags(trial.config, self.axes)}
        try:
            super().log_trial_start(trial)
        finally:
            self.tags = common


class WandbCallback(WandbLoggerCallback):
    """Ray's W&B logger, with each run tagged `axis=value` for its trial's grid values."""

    def __init__(self, axes: Sequence[str], **kwargs: Any):
        super().__init__(**kwargs)
        self.axes = list(axes)

    def log_trial_start(self, trial: Any) -> None:
        common = self.kwargs
        tags = axis_tags(trial.config, self.axes)
        self.kwargs = {**common, "tags": [f"{k}={v}" for k, v in tags.items() if k != "cell"]}
        try:
            super().log_trial_start(trial)
        finally:
            self.kwargs = common


def missing_setup(tracker: str) -> str | None:
    """What keeps `tracker` from logging here (its package, its settings), or None."""
    package = {"mlflow": "mlflow", "wandb": "wandb"}[tracker]
    if importlib.util.find_spec(package) is None:
        return f"{tracker} is not installed: pip install -e '.[{tracker}]'"
    if tracker == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
        return "mlflow needs MLFLOW_TRACKING_URI: your tracking server, or a local store"
    if tracker == "wandb" and os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
        import wandb

        if not (os.environ.get("WANDB_API_KEY") or wandb.api.api_key):
            return "wandb needs WANDB_API_KEY or `wandb login` (or WANDB_MODE=offline)"
    return None


def callbacks(trackers: Sequence[str], axes: Sequence[str], experiment: str) -> list[Any]:
    """The logger callbacks of `trackers` for the Tune experiment `experiment`."""
    made: list[Any] = []
    if "mlflow" in trackers:
        made.append(MLflowCallback(axes, experiment_name=experiment))
    if "wandb" in trackers:
        project = os.environ.get("WANDB_PROJECT", DEFAULT_WANDB_PROJECT)
        made.append(WandbCallback(axes, project=project, group=experiment))
    return made
