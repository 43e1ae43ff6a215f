"""A sweep's plan as Ray Tune runs it: the param space, the TuneConfig, the trial names, the
progress table, the trackers' callbacks, and `Launcher`, which builds the trainable and the Tuner.

A planned sweep is a grid over `index`, the position of each Ray trial in `Space.groups` (one
trial, or a group of students sharing the teacher's pass), with each axis that is one value per
Ray trial shown as a column of its own; an Optuna sweep is the ranges Optuna samples. Ray is
imported only when a Tune object is built, so that a dry run never loads it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tune_kd import plan
from tune_kd.config import Config
from tune_kd.data import Arrays
from tune_kd.space import Range, Resources, Scheduler, Search, Space, Trial
from tune_kd.storage import Storage

# The progress table's metric columns, each with its heading.
METRIC_COLUMNS = {
    "epoch": "epoch",
    "test_acc": "acc",
    "best_test_acc": "best",
    "diverged": "diverged",
}


class Launcher:
    """Ray Tune for one storage location: builds the trainable and the Tuner, runs or restores.

    `teacher_states` of each method holds the weights of every teacher, keyed as the trials'
    `teacher_checkpoint` (`teachers.load_states`)."""

    def __init__(
        self,
        storage: Storage,
        data: Mapping[str, Arrays],
        resources: Resources,
        max_concurrent: int | None,
        max_failures: int,
    ):
        self.storage = storage
        self.data = data
        self.resources = resources
        self.max_concurrent = max_concurrent
        self.max_failures = max_failures

    def trainable(self, space: Space, teacher_states: Mapping[str, Any]) -> Any:
        from ray import tune

        from tune_kd.trainable import train_trial

        bound = tune.with_parameters(
            train_trial,
            plan=planned_members(space),
            base=space.sampling_base,
            data=self.data,
            teachers=teacher_states,
            threads=self.resources.threads,
        )
        return tune.with_resources(bound, {"cpu": self.resources.cpu, "gpu": self.resources.gpu})

    def tuner(self, space: Space, name: str, teacher_states: Mapping[str, Any]) -> Any:
        from ray import tune

        from tune_kd.trainable import KeepResultsOnRetry

        use_table_output()
        run_config = tune.RunConfig(
            name=name,
            storage_path=self.storage.uri,
            failure_config=tune.FailureConfig(max_failures=self.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            progress_reporter=progress_reporter(space, self.storage.uri_of(name)),
            callbacks=[KeepResultsOnRetry(), *tracker_callbacks(space, name)],
            verbose=1,
        )
        return tune.Tuner(
            self.trainable(space, teacher_states),
            param_space=param_space(space),
            tune_config=tune_config(space, self.max_concurrent),
            run_config=run_config,
        )

    def fit_alone(
        self,
        space: Space,
        name: str,
        configs: Sequence[Config],
        teacher_states: Mapping[str, Any] | None = None,
        results: Callable[[Any, Space], list[bytes | None]] | None = None,
    ) -> list[bytes | None]:
        """Run `configs` (what a sweep trains first: its teachers, or its stage-1 runs, which
        distil from `teacher_states`) as an experiment of their own under `space`'s metric and
        trackers: one Tune trial each, labelled by its student, without search or scheduler;
        each one's `results` (default `final_students`; None: it failed)."""
        trials = [Trial(i, {"student": c.student}, c) for i, c in enumerate(configs)]
        alone = dataclasses.replace(
            space,
            name=name,
            trials=trials,
            axes=["student"],
            teachers=[],
            stage1=[],
            search=Search(),
            scheduler=Scheduler(),
            group_students=False,
        )
        ended = self.tuner(alone, name, teacher_states or {}).fit()
        return (results or final_students)(ended, alone)

    def restore(self, space: Space, name: str, teacher_states: Mapping[str, Any]) -> Any:
        """The Tuner that continues experiment `name`: its unfinished and failed trials, shown
        in the same progress table as its first run."""
        from ray import tune

        use_table_output()
        location = self.storage.uri_of(name)
        restored = tune.Tuner.restore(
            location, self.trainable(space, teacher_states), resume_errored=True
        )
        # Tune restores the run's settings as the first run saved them; the table is this
        # version's (an experiment of an earlier version saved Tune's own reporter).
        restored._local_tuner.get_run_config().progress_reporter = progress_reporter(
            space, location
        )
        return restored


def final_students(results: Any, space: Space) -> list[bytes | None]:
    """Weights exported by each finished, non-diverged student, in plan order."""
    return _finished(results, space, lambda student, run: student.read_bytes())


def final_runs(results: Any, space: Space) -> list[bytes | None]:
    """The final run checkpoint (`tune_kd.train.Run.save`: every student of the Tune trial, its
    projectors, its configuration) of each finished, non-diverged student, in plan order."""
    return _finished(results, space, lambda student, run: run.read_bytes())


def _finished(
    results: Any, space: Space, read: Callable[[Path, Path], bytes]
) -> list[bytes | None]:
    """`read(student's exported weights, run checkpoint)` of each student that exported its
    weights in its Tune trial's last checkpoint (it finished without diverging), in plan order."""
    from tune_kd.trainable import RUN_STATE, student_file

    found: list[bytes | None] = [None] * len(space.trials)
    for result in results:
        if result.error or result.checkpoint is None or "index" not in result.config:
            continue
        with result.checkpoint.as_directory() as folder:
            for position, trial in enumerate(space.groups[result.config["index"]]):
                path = Path(folder) / student_file(position)
                if path.exists():
                    found[trial.index] = read(path, Path(folder) / RUN_STATE)
    return found


def member_params(trial: Trial) -> dict[str, Any]:
    """One student as the trainable receives it: plan index, axes and configuration."""
    return {"index": trial.index, "axes": trial.axes, "config": trial.config.to_dict()}


def planned_members(space: Space) -> list[list[dict[str, Any]]]:
    """The students of each planned Ray trial (`member_params`), in the order of `space.groups`."""
    return [[member_params(t) for t in group] for group in space.groups]


# ----------------------------------------------------------------------------- Tune's configuration


def param_space(space: Space) -> dict[str, Any]:
    """Tune's view of the plan: a grid over packed trials, each axis shown as a column of its own;
    or the ranges Optuna samples."""
    from ray import tune

    if space.search.algorithm == "optuna":
        return {key: _domain(r) for key, r in space.search.ranges.items()}
    packed = space.groups
    params: dict[str, Any] = {"index": tune.grid_search(list(range(len(packed))))}
    if space.group_students:
        params["students"] = tune.sample_from(_PlannedValue([len(g) for g in packed]))
    for axis in space.axes:
        values = [[t.axes.get(axis) for t in group] for group in packed]  # lists: not hashable
        if all(v.count(v[0]) == len(v) for v in values):
            params[axis] = tune.sample_from(_PlannedValue([v[0] for v in values]))
    return params


def shown_params(space: Space) -> list[str]:
    """The keys every trial's config has for the progress table: the plan's columns, or the
    values Optuna samples (a group's trial holds only the axes all its students share)."""
    return [key for key in param_space(space) if key != "index"]


class _PlannedValue:
    """A plan column for Tune: the value of one axis in the trial whose index was drawn."""

    def __init__(self, values: list[Any]):
        self.values = values

    def __call__(self, config: dict[str, Any]) -> Any:
        return self.values[config["index"]]


def _domain(r: Range) -> Any:
    from ray import tune

    make = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}
    return tune.choice(list(r.args)) if r.kind == "choice" else make[r.kind](*r.args)


def tune_config(space: Space, max_concurrent: int | None) -> Any:
    """Metric, scheduler, search algorithm and trial names of the sweep."""
    from ray import tune

    scheduler = search_alg = None
    if space.scheduler.name == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=max(t.config.epochs for t in space.trials),
            grace_period=space.scheduler.grace_period,
            reduction_factor=space.scheduler.reduction_factor,
        )
    if space.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=space.search.seed)
    return tune.TuneConfig(
        metric=space.metric,
        mode="max",
        scheduler=scheduler,
        search_alg=search_alg,
        num_samples=space.search.samples if space.search.algorithm == "optuna" else 1,
        max_concurrent_trials=max_concurrent,
        trial_name_creator=trial_name,
        trial_dirname_creator=trial_name,
    )


def trial_name(trial: Any) -> str:
    """A Tune trial's name and folder (`plan.trial_folder_name`): `trial_0007` for planned trial
    7, `group_0002` for a packed group, `trial_<Tune's id>` when Optuna sampled it."""
    if "index" not in trial.config:
        return plan.sampled_folder_name(trial.trial_id)
    return plan.trial_folder_name(trial.config["index"], grouped="students" in trial.config)


# ----------------------------------------------------------------------------- what it shows


def use_table_output() -> None:
    """Make Tune print its progress table (`progress_reporter`) rather than its newer per-trial
    output, which ignores reporters: its table scales better to large sweeps. Tune reads this
    setting, an environment variable of the driver's process, when a Tuner fits."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"


def progress_reporter(space: Space, location: str) -> Any:
    """One compact table of every trial: its grid values and accuracies, best first, under the
    experiment's `location` in the storage."""
    from tune_kd.progress import ProgressTable

    return ProgressTable(
        location,
        parameter_columns=shown_params(space),
        metric_columns=dict(METRIC_COLUMNS),
        max_report_frequency=30,
        print_intermediate_tables=True,  # by default only while Tune's verbosity is at its start
        max_progress_rows=50,
        sort_by_metric=True,
    )


def tracker_callbacks(space: Space, experiment: str) -> list[Any]:
    """Ray Tune's logger callbacks of the space's trackers, one run per planned trial
    (TensorBoard's, one per Tune trial, is always on)."""
    if not space.trackers:
        return []
    from tune_kd import trackers

    axes = space.axes or list(space.search.ranges)  # a grid's axes, or Optuna's sampled keys
    return trackers.callbacks(
        space.trackers,
        axes,
        experiment,
        students=planned_members(space),
        base=space.sampling_base,
        overrides=space.overrides,
    )


# ----------------------------------------------------------------------------- stopping a sweep

# The exit status of a sweep stopped by each signal: 128 plus the signal's number, as a shell
# reports a process that the signal ended.
STOP_SIGNALS = {
    signal.SIGINT: 128 + signal.SIGINT,  # 130: Ctrl-C
    signal.SIGTERM: 128 + signal.SIGTERM,  # 143: kill, a scheduler's cancel
    signal.SIGUSR1: 128 + signal.SIGUSR1,  # 138: SLURM's warning before a requeue
}


class StopSignals:
    """While entered, SIGINT and SIGTERM stop the sweep as Tune stops it on SIGUSR1: the trials
    are stopped and the experiment's state saved so that --resume continues it. Tune handles
    SIGUSR1 itself (and SIGINT too, unless told not to, as here), not SIGTERM. A second signal
    stops at once, without saving. `received`: the first signal, when one came."""

    def __init__(self) -> None:
        self.received: int | None = None

    def __enter__(self) -> StopSignals:
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # read when a Tuner fits
        self.previous = {s: signal.signal(s, self.stop) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exception: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def stop(self, number: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = number
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if callable(tune_stop):  # Tune's, installed while a Tuner fits
            tune_stop(signal.SIGUSR1, frame)

    def exit_status(self) -> int:
        """The exit status of a stopped sweep: that of the signal received, else of SIGUSR1 (the
        one Tune handles alone)."""
        return STOP_SIGNALS[self.received or signal.SIGUSR1]
