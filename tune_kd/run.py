"""Run a sweep: `python -m tune_kd.run --space search_spaces/<grid>.yaml`.

Validates the space file in full, trains the teachers it needs (once: they are cached under the
storage by a hash of their recipe), then runs every trial with Ray Tune, on a local Ray or the
cluster of `--address auto`, and ends with the results' tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from tune_kd import cli, cost, models
from tune_kd import data as datasets
from tune_kd import space as spaces
from tune_kd.config import ConfigError
from tune_kd.space import Space, SpaceError, TeacherNeed, Trial
from tune_kd.storage import PLAN_FILE, Storage
from tune_kd.train import parse_overrides

DEFAULT_SPACE = Path("search_spaces/study_losses.yaml")
DEFAULT_STORAGE = "results"


# ----------------------------------------------------------------------------- teachers


def teacher_parts(need: TeacherNeed) -> tuple[str, str, str]:
    """Where a recipe's teacher is cached: the field's `<arch>_vanilla/ckpt_epoch_<E>.pth` layout,
    with the recipe's hash in the folder name."""
    assert need.recipe is not None
    folder = f"{need.arch}_vanilla-{spaces.recipe_hash(need.recipe)}"
    return "teachers", folder, f"ckpt_epoch_{need.recipe.epochs}.pth"


def with_teacher_paths(space: Space, storage: Storage) -> Space:
    """Point the trials that distil from a recipe's teacher at its cached checkpoint."""
    trials = []
    for trial in space.trials:
        config = trial.config
        if config.method != "student" and config.teacher_checkpoint is None:
            recipe = spaces.teacher_recipe(config, space.teacher_train or {})
            path = storage.uri_of(*teacher_parts(TeacherNeed(config.teacher, recipe=recipe)))
            config = dataclasses.replace(config, teacher_checkpoint=path)
        trials.append(dataclasses.replace(trial, config=config))
    return dataclasses.replace(space, trials=trials)


def numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def load_teacher_states(space: Space, storage: Storage) -> dict[str, dict[str, np.ndarray]]:
    """The weights of every teacher of the plan, keyed as the trials' `teacher_checkpoint`."""
    states = {}
    for need in space.teachers:
        if need.checkpoint:
            states[need.checkpoint] = numpy_state(
                models.load_checkpoint(need.checkpoint, need.arch)
            )
            continue
        parts = teacher_parts(need)
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / parts[-1]
            local.write_bytes(storage.read(*parts))
            model = models.load_checkpoint(local, name=need.arch)
        states[storage.uri_of(*parts)] = numpy_state(model)
    return states


def train_missing_teachers(space: Space, storage: Storage, launcher: Launcher) -> None:
    """Train, as Tune trials, the recipe teachers not yet in the cache, and cache them."""
    missing = [n for n in space.teachers if n.recipe and not storage.exists(*teacher_parts(n))]
    if not missing:
        return
    print(f"training {len(missing)} teacher(s) first: {', '.join(n.arch for n in missing)}")
    trials = [Trial(i, {"student": n.arch}, n.recipe) for i, n in enumerate(missing)]
    teacher_space = dataclasses.replace(
        space,
        name="teachers",
        trials=trials,
        axes=["student"],
        teachers=[],
        search=spaces.Search(),
        scheduler=spaces.Scheduler(),
        group_students=False,
    )
    name = f"teachers-{time.strftime('%Y%m%d-%H%M%S')}"
    results = launcher.fit(teacher_space, name, teachers={})
    for need, result in zip(missing, results):
        if result is None:
            raise RuntimeError(f"training teacher {need.arch} failed: see {storage.uri_of(name)}")
        storage.write(result, *teacher_parts(need))
        storage.write(
            yaml.safe_dump(need.recipe.to_dict()).encode(), *teacher_parts(need)[:2], "config.yaml"
        )


# ----------------------------------------------------------------------------- Ray


class Launcher:
    """Ray Tune for one storage location: builds the trainable and the Tuner, runs or restores."""

    def __init__(
        self,
        storage: Storage,
        data: Mapping[str, datasets.Arrays],
        resources: spaces.Resources,
        max_concurrent: int | None,
        max_failures: int,
    ):
        self.storage = storage
        self.data = data
        self.resources = resources
        self.max_concurrent = max_concurrent
        self.max_failures = max_failures

    def trainable(self, space: Space, teachers: Mapping[str, Any]) -> Any:
        from ray import tune

        from tune_kd.trainable import train_trial

        bound = tune.with_parameters(
            train_trial,
            plan=[[spaces.member_params(t) for t in group] for group in spaces.groups(space)],
            base=sampling_base(space),
            data=self.data,
            teachers=teachers,
            threads=max(1, int(self.resources.cpu)),
        )
        return tune.with_resources(bound, {"cpu": self.resources.cpu, "gpu": self.resources.gpu})

    def tuner(self, space: Space, name: str, teachers: Mapping[str, Any]) -> Any:
        from ray import tune

        from tune_kd.trainable import KeepResultsOnRetry

        run_config = tune.RunConfig(
            name=name,
            storage_path=self.storage.uri,
            failure_config=tune.FailureConfig(max_failures=self.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            progress_reporter=progress_reporter(space),
            callbacks=[KeepResultsOnRetry(), *tracker_callbacks(space, name)],
            verbose=1,
        )
        return tune.Tuner(
            self.trainable(space, teachers),
            param_space=spaces.param_space(space),
            tune_config=spaces.tune_config(space, self.max_concurrent),
            run_config=run_config,
        )

    def fit(self, space: Space, name: str, teachers: Mapping[str, Any]) -> list[bytes | None]:
        """Run `space` to the end; each planned trial's final student weights (None: it failed)."""
        results = self.tuner(space, name, teachers).fit()
        return final_students(results, space)

    def restore(self, space: Space, name: str, teachers: Mapping[str, Any]) -> Any:
        from ray import tune

        return tune.Tuner.restore(
            self.storage.uri_of(name), self.trainable(space, teachers), resume_errored=True
        )


def final_students(results: Any, space: Space) -> list[bytes | None]:
    """Weights exported by each finished, non-diverged student, in plan order."""
    from tune_kd.trainable import student_file

    packed = spaces.groups(space)
    students: list[bytes | None] = [None] * len(space.trials)
    for result in results:
        if result.error or result.checkpoint is None or "index" not in result.config:
            continue
        with result.checkpoint.as_directory() as folder:
            for position, trial in enumerate(packed[result.config["index"]]):
                path = Path(folder) / student_file(position)
                if path.exists():
                    students[trial.index] = path.read_bytes()
    return students


def progress_reporter(space: Space) -> Any:
    """One compact table of every trial: its grid values and accuracies, best first."""
    from ray import tune

    # Tune's newer per-trial boxes ignore reporters; its table scales better to large sweeps.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    return tune.CLIReporter(
        parameter_columns=spaces.shown_params(space),
        metric_columns={
            "epoch": "epoch",
            "test_acc": "acc",
            "best_test_acc": "best",
            "diverged": "diverged",
        },
        max_report_frequency=30,
        print_intermediate_tables=True,  # by default only while Tune's verbosity is at its start
        max_progress_rows=50,
        sort_by_metric=True,
    )


def with_trackers(space: Space, added: Sequence[str]) -> Space:
    """The space file's trackers and those of `--tracker`, each ready to log (else one line)."""
    names = list(dict.fromkeys([*space.trackers, *added]))
    if not names:
        return space
    from tune_kd import trackers

    for name in names:
        problem = trackers.missing_setup(name)
        if problem:
            raise SpaceError(space.path, "trackers", problem)
    return dataclasses.replace(space, trackers=names)


def tracker_callbacks(space: Space, experiment: str) -> list[Any]:
    """Ray Tune's logger callbacks of the space's trackers (TensorBoard's is always on)."""
    if not space.trackers:
        return []
    from tune_kd import trackers

    axes = space.axes or list(space.search.ranges)  # a grid's axes, or Optuna's sampled keys
    return trackers.callbacks(space.trackers, axes, experiment)


LOOPBACK = "127.0.0.1"


def start_ray(address: str | None) -> bool:
    """Connect to the Ray cluster at `address` ("auto": the one of this node, or RAY_ADDRESS's),
    or without one start a Ray of this process's own on 127.0.0.1; True when it started one."""
    import ray

    quiet = {"log_to_driver": False, "configure_logging": True, "logging_level": "ERROR"}
    context = start_local_ray(**quiet) if address is None else ray.init(address=address, **quiet)
    url = getattr(context, "dashboard_url", None)
    if url:
        print(f"Ray dashboard: http://{url} (token: ray get-auth-token)")
    return address is None


def start_local_ray(**options: Any) -> Any:
    """`ray.init` of a new Ray on this machine, never one that RAY_ADDRESS or Ray's address file
    (left by any `ray start`, stale or someone else's) points at, with every server (GCS, raylet
    and object manager, workers, dashboard and its agents, metrics) on 127.0.0.1 only."""
    import ray
    from ray._private import ray_constants

    if os.environ.get("RAY_ADDRESS"):
        print("RAY_ADDRESS is set but a sweep joins a cluster only with --address auto")
    # Ray's servers bind 127.0.0.1 alone when it is the node's address, but Ray replaces that
    # address with the machine's network one unless multi-node clusters are off (as on macOS).
    clusters = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        return ray.init(
            address="local", _node_ip_address=LOOPBACK, dashboard_host=LOOPBACK, **options
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = clusters


def effective_resources(requested: spaces.Resources, local: bool) -> spaces.Resources:
    """On a local Ray without GPUs, run on CPUs (and say so) rather than wait for a GPU forever."""
    import ray

    if requested.gpu and local and not ray.cluster_resources().get("GPU"):
        print(f"no GPU on this machine: each trial runs on {requested.cpu:g} CPU(s) instead")
        return dataclasses.replace(requested, gpu=0.0)
    return requested


# ----------------------------------------------------------------------------- plan


def describe_plan(space: Space) -> str:
    """What a dry run prints: the trials, their count, the resources and the GPU-hours."""
    lines = [
        f"{space.path}: {space.name}" + (f" — {space.description}" if space.description else "")
    ]
    if space.search.algorithm == "optuna":
        ranges = ", ".join(f"{k} ~ {r.kind}{list(r.args)}" for k, r in space.search.ranges.items())
        lines.append(f"optuna TPE: {space.search.samples} samples of {ranges}")
    else:
        lines += [
            f"  {t.index:>4}  " + "  ".join(f"{k}={v}" for k, v in t.axes.items())
            for t in space.trials
        ]
    packed = spaces.groups(space)
    lines.append(
        f"{space.planned} trials"
        + (f" in {len(packed)} groups sharing the teacher's pass" if space.group_students else "")
    )
    lines.append(
        f"resources per trial: {space.resources.cpu:g} CPU, {space.resources.gpu:g} GPU;"
        f" scheduler {space.scheduler.name}; search {space.search.algorithm}"
    )
    for need in space.teachers:
        source = need.checkpoint or f"trained first (recipe {spaces.recipe_hash(need.recipe)})"
        lines.append(f"teacher {need.arch}: {source}")
    hours, alone = plan_gpu_hours(space), plan_gpu_hours(space, grouped=False)
    lines.append(
        f"estimated compute: {hours:.1f} GPU-hours"
        + (f" ({alone:.1f} one trial at a time)" if hours != alone else "")
        + " from throughput measured on one H100 (docs/PERFORMANCE.md)"
    )
    return "\n".join(lines)


def plan_gpu_hours(space: Space, grouped: bool = True) -> float:
    """Every Ray trial's estimate (an Optuna search: its samples at the base's cost), and the
    teachers trained first. `grouped=False`: every trial alone."""
    packed = spaces.groups(space) if grouped else [[t] for t in space.trials]
    hours = sum(cost.group_gpu_hours([t.config for t in group]) for group in packed)
    if space.search.algorithm == "optuna":
        hours *= space.search.samples
    return hours + sum(cost.gpu_hours(n.recipe) for n in space.teachers if n.recipe)


def sampling_base(space: Space) -> dict[str, Any]:
    """The configuration Optuna's sampled values complete (with its teacher's checkpoint), or
    nothing for a grid, whose trials are planned in full."""
    return space.trials[0].config.to_dict() if space.search.algorithm == "optuna" else {}


def write_plan(
    storage: Storage,
    name: str,
    space: Space,
    space_text: str,
    overrides: Mapping[str, Any],
    resources: spaces.Resources,
) -> None:
    """The plan beside Tune's files: every planned trial, so none is ever silently lost."""
    plan = {
        "name": space.name,
        "resources": dataclasses.asdict(resources),
        "space_file": str(space.path),
        "space_text": space_text,
        "overrides": dict(overrides),
        "planned": space.planned,
        "axes": space.axes,
        "base": sampling_base(space),
        "base_labels": space.trials[0].labels if space.search.algorithm == "optuna" else {},
        "groups": [[t.index for t in group] for group in spaces.groups(space)],
        "metric": space.metric,
        "trials": [
            {"index": t.index, "axes": t.axes, "labels": t.labels, "config": t.config.to_dict()}
            for t in space.trials
            if space.search.algorithm == "grid"  # Optuna's trials are sampled as it runs
        ],
    }
    storage.write(json.dumps(plan, indent=1, default=str).encode(), name, PLAN_FILE)


# ----------------------------------------------------------------------------- command line


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m tune_kd.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", type=Path, default=DEFAULT_SPACE, help="search-space file")
    parser.add_argument(
        "--storage", default=DEFAULT_STORAGE, help="results folder or URI (s3://...)"
    )
    parser.add_argument("--name", help="experiment name (default <space name>-<time>)")
    parser.add_argument(
        "--address", help="Ray cluster address (auto on a cluster; default: local Ray)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted experiment (--name, or the space's latest)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="validate and print the plan, then exit"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the space file (a swept key replaces its axis)",
    )
    parser.add_argument(
        "--tracker",
        action="append",
        default=[],
        choices=spaces.TRACKERS,
        help="also log every trial to this experiment tracker (repeatable; the file's `trackers`)",
    )
    parser.add_argument(
        "--max-concurrent", type=cli.positive_int, metavar="N", help="trials running at once"
    )
    parser.add_argument(
        "--max-failures", type=int, default=3, metavar="N", help="retries per trial"
    )
    return parser


def experiment_name(args: argparse.Namespace, space: Space, storage: Storage) -> str:
    if args.name is not None:
        try:
            spaces.check_folder_name("--name", args.name)
        except ConfigError as error:
            raise SpaceError(space.path, error.key, error.detail) from None
    if not args.resume:
        name = args.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if storage.exists(name, PLAN_FILE):
            raise SpaceError(
                space.path, "--name", f"experiment '{name}' exists: add --resume to continue it"
            )
        return name
    if args.name:
        if not storage.exists(args.name, PLAN_FILE):
            raise SpaceError(space.path, "--name", f"no experiment '{args.name}' in {storage.uri}")
        return args.name
    earlier = [
        f
        for f in storage.folders()
        if f.startswith(space.name + "-") and storage.exists(f, PLAN_FILE)
    ]
    if not earlier:
        raise SpaceError(
            space.path, "--resume", f"no earlier experiment of '{space.name}' in {storage.uri}"
        )
    return earlier[-1]


def prepare(args: argparse.Namespace) -> tuple[Space, Storage, str, str, dict[str, Any]]:
    """Everything that can fail on bad input, before anything is written or started."""
    storage = Storage(args.storage)
    overrides = parse_overrides(args.set)
    space = spaces.load(args.space, overrides)  # one clear line if the file cannot be read
    space_text = args.space.read_text()
    unwritable = storage.unwritable()
    if unwritable:
        raise ConfigError("--storage", unwritable)
    name = experiment_name(args, space, storage)
    if args.resume:  # the experiment's own plan, not the file as it is now
        space_text, overrides = planned_space(storage, name)
        space = spaces.load_text(space_text, args.space, overrides)
    space = with_trackers(space, args.tracker)
    return space, storage, name, space_text, overrides


def planned_space(storage: Storage, name: str) -> tuple[str, dict[str, Any]]:
    """The space file's text and the overrides an experiment was planned with."""
    try:
        plan = json.loads(storage.read(name, PLAN_FILE))
        return plan["space_text"], plan["overrides"]
    except (ValueError, TypeError, KeyError) as error:
        where = storage.uri_of(name, PLAN_FILE)
        raise ConfigError("--resume", f"{where} is not a readable plan ({error!r})") from None


def load_datasets(space: Space) -> dict[str, datasets.Arrays]:
    """Every dataset the plan trains on, loaded once here, keyed by `Config.data_key`."""
    from tune_kd.train import load_data

    unique = {t.config.data_key: t.config for t in space.trials}
    return {key: load_data(config) for key, config in unique.items()}


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        space, storage, name, space_text, overrides = prepare(args)
        if args.dry_run:
            print(describe_plan(space))
            return 0
        data = load_datasets(space)
    except (SpaceError, ConfigError, datasets.DatasetUnavailable) as error:
        return cli.fail(error)
    local = start_ray(args.address)
    launcher = Launcher(
        storage,
        data,
        effective_resources(space.resources, local),
        args.max_concurrent,
        args.max_failures,
    )
    try:
        train_missing_teachers(space, storage, launcher)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    space = with_teacher_paths(space, storage)
    teachers = load_teacher_states(space, storage)
    if args.resume:
        print(f"resuming {storage.uri_of(name)}")
        results = launcher.restore(space, name, teachers).fit()
    else:
        write_plan(storage, name, space, space_text, overrides, launcher.resources)
        results = launcher.tuner(space, name, teachers).fit()
    cache_finished_teachers(space, storage, results)
    failed = report_results(storage, name).failures
    if failed:
        print(f"error: {len(failed)} of {space.planned} trials failed", file=sys.stderr)
        return 1
    return 0


def cache_finished_teachers(space: Space, storage: Storage, results: Any) -> None:
    """Cross-entropy runs of the paper's recipe double as teachers for later sweeps."""
    for trial, weights in zip(space.trials, final_students(results, space)):
        if weights is None or trial.config.method != "student":
            continue
        need = TeacherNeed(trial.config.student, recipe=trial.config)
        if not storage.exists(*teacher_parts(need)):
            storage.write(weights, *teacher_parts(need))


def report_results(storage: Storage, name: str) -> Any:
    """The tables and plots of the experiment, and where they are; the `analysis.Report`."""
    from tune_kd import analysis

    report = analysis.write_report(storage.uri_of(name))
    print()
    print(analysis.format_summary(report.summary, report.metric, report.files, report.failures))
    return report


if __name__ == "__main__":
    sys.exit(main())
