"""Run a sweep: `python -m tune_kd.run --space search_spaces/<grid>.yaml`.

Validates the space file in full, trains the teachers it needs, then the stage-1 SimKD runs its
sequential trials start from (each once: they are cached under the storage by a hash of their
configuration), then runs every trial with Ray Tune, on a local Ray or the
cluster of `--address auto`, and ends with the results' tables. SIGINT, SIGTERM or SIGUSR1 stop
it with its state saved (exit status 128 + the signal's number), and `--resume` continues it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tune_kd import cli, cost, distillers, params, plan, stage1, teachers, tuner
from tune_kd import data as datasets
from tune_kd import space as spaces
from tune_kd.config import ConfigError
from tune_kd.space import Space, SpaceError
from tune_kd.storage import DEFAULT_STORAGE, Storage
from tune_kd.train import parse_overrides

DEFAULT_SPACE = Path("search_spaces/study_losses.yaml")

# A trial's status in the results' tables (`analysis.load_experiment`) that --resume would run on,
# and those of a trial that ran to its end.
UNFINISHED = ("running", "pending")
FINISHED = ("completed", "diverged")
# The files in which Tune saves an experiment's state, which --resume continues.
TUNE_STATE_PREFIX = "experiment_state-"


# ----------------------------------------------------------------------------- Ray


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


# ----------------------------------------------------------------------------- the dry run


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
    packed = space.groups
    lines.append(
        f"{space.planned} trials"
        + (f" in {len(packed)} groups sharing the teacher's pass" if space.group_students else "")
    )
    lines.append(
        f"resources per trial: {space.resources.cpu:g} CPU, {space.resources.gpu:g} GPU;"
        f" scheduler {space.scheduler.name}; search {space.search.algorithm}"
    )
    lines += method_notes(space)
    lines += deployment_notes(space)
    for need in space.teachers:
        source = need.checkpoint or (
            f"trained first (recipe {teachers.recipe_hash(need.recipe)}, seed {need.recipe.seed})"
        )
        lines.append(f"teacher {need.arch}: {source}")
    for run in space.stage1:
        lines.append(
            f"stage-1 SimKD run {run.config.teacher} -> {run.config.student}: "
            f"trained first (recipe {run.hash}, seed {run.config.seed})"
        )
    lines.append(f"estimated compute: {estimated_compute(space)}")
    return "\n".join(lines)


def estimated_compute(space: Space) -> str:
    """The dry run's estimate: GPU-hours on one H100 to one decimal (`under 0.05` rather than a
    rounded 0.0), or `-` for trials that run on CPUs, where none is known."""
    if not space.resources.gpu:
        return "- (trials run on CPUs; the estimate is of GPU time only)"
    hours, alone = plan_gpu_hours(space), plan_gpu_hours(space, grouped=False)

    def shown(value: float) -> str:
        return f"{value:.1f}" if value >= 0.05 else "under 0.05"

    return (
        f"{shown(hours)} GPU-hours"
        + (f" ({shown(alone)} one trial at a time)" if hours != alone else "")
        + " from throughput measured on one H100 (docs/PERFORMANCE.md)"
    )


def method_notes(space: Space) -> list[str]:
    """What the plan's methods need beyond the rest: memory of their own, and, where students
    would be fused, which methods train one after another instead."""
    lines = []
    configs = {t.config.method: t.config for t in space.trials}
    for method, config in configs.items():
        extra = distillers.get(method).extra_memory_bytes(config, cost.train_images(config))
        if extra:
            lines.append(
                f"method {method}: each trial needs about {format_bytes(extra)} of device "
                f"memory beyond its networks' (batch {config.batch_size})"
            )
    fusing = space.group_students and any(t.config.fuse_students for t in space.trials)
    apart = [m for m in configs if not distillers.get(m).fusable]
    if fusing and apart:
        lines.append(f"not fused, trained one after another in their groups: {', '.join(apart)}")
    return lines


def deployment_notes(space: Space) -> list[str]:
    """Per distinct configuration, the parameters of the network it deploys and its pruning ratio
    (`tune_kd.params`) against its teacher; for a student trained alone, against the plan's
    teacher when it has only one."""
    archs = {need.arch for need in space.teachers}
    reference = archs.pop() if len(archs) == 1 else None
    shown: dict[str, str] = {}
    for trial in space.trials:
        config = trial.config
        method = distillers.get(config.method)
        label = {"method": config.method, "student": config.student}
        if method.uses_teacher:
            label["teacher"] = config.teacher
        label.update(zip(method.structure_keys, distillers.structure(config)))
        name = " ".join(f"{k}={v}" for k, v in label.items())
        if name in shown:
            continue
        try:
            result = params.deployed(config, reference)
        except ValueError as error:
            raise SpaceError(space.path, "reuse_stage", str(error)) from error
        ratio = (
            "" if result.pruning_ratio is None else f", pruning ratio {result.pruning_ratio:.2f} %"
        )
        shown[name] = f"  {name}: {result.parameters:,} parameters{ratio}"
    return ["deployed parameters per configuration:", *shown.values()] if shown else []


def format_bytes(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


def plan_gpu_hours(space: Space, grouped: bool = True) -> float:
    """Every Ray trial's estimate (an Optuna search: its samples at the base's cost), and the
    teachers and stage-1 runs trained first. `grouped=False`: every trial alone."""
    packed = space.groups if grouped else [[t] for t in space.trials]
    hours = sum(cost.group_gpu_hours([t.config for t in group]) for group in packed)
    if space.search.algorithm == "optuna":
        hours *= space.search.samples
    first = [n.recipe for n in space.teachers if n.recipe] + [n.config for n in space.stage1]
    return hours + sum(cost.gpu_hours(config) for config in first)


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
        help="continue a stopped experiment (--name, or the space's latest unfinished one)",
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
        if plan.has_plan(storage, name):
            raise SpaceError(
                space.path, "--name", f"experiment '{name}' exists: add --resume to continue it"
            )
        return name
    if args.name:
        if not plan.has_plan(storage, args.name):
            raise SpaceError(space.path, "--name", f"no experiment '{args.name}' in {storage.uri}")
        return args.name
    unfinished = unfinished_experiments(storage, space.name)
    if not unfinished:
        raise SpaceError(
            space.path,
            "--resume",
            f"no unfinished experiment of '{space.name}' in {storage.uri} (all ran to their end)",
        )
    return unfinished[-1]


def unfinished_experiments(storage: Storage, space_name: str) -> list[str]:
    """The experiments of space `space_name` in the storage that --resume can continue (Tune saved
    their state, and it records fewer trials than planned or one not ended), the one saved last
    at the end."""
    from pyarrow.fs import FileSelector

    from tune_kd.analysis.read import read_states

    found = []
    for folder in storage.folders():
        experiment = Storage(storage.uri_of(folder))
        try:
            planned = plan.read_plan(experiment)
        except plan.PlanError:
            continue
        if planned.get("name") != space_name:
            continue
        files = experiment.fs.get_file_info(FileSelector(experiment.root))
        saved = [f for f in files if f.base_name.startswith(TUNE_STATE_PREFIX)]
        if not saved:  # stopped before Tune saved anything: nothing to continue
            continue
        trials = read_states(experiment, [f.base_name for f in saved], problems=[])
        ended = [t for t in trials.values() if t.get("status") == "TERMINATED"]
        # Tune's trials: a grid's groups (one trial, or students sharing a teacher), or samples
        tune_trials = len(planned.get("groups") or []) if planned.get("trials") else None
        if len(ended) < (tune_trials or int(planned.get("planned") or 0)):
            found.append((max(f.mtime_ns or 0 for f in saved), folder))
    return [folder for _, folder in sorted(found)]


def forget_unstarted(storage: Storage, name: str) -> None:
    """Remove the plan of experiment `name` when none of its trials started (its folder holds no
    trial folder and no state Tune saved), so that a sweep that failed before its first trial
    runs again with the same command rather than ask for --resume, which has nothing to
    continue."""
    from pyarrow.fs import FileSelector

    experiment = Storage(storage.uri_of(name))
    entries = experiment.fs.get_file_info(FileSelector(experiment.root, allow_not_found=True))
    started = [
        e.base_name
        for e in entries
        if e.base_name.startswith((*plan.FOLDER_PREFIXES, TUNE_STATE_PREFIX))
    ]
    if not started and experiment.exists(plan.PLAN_FILE):
        experiment.remove(plan.PLAN_FILE)


def with_trackers(space: Space, added: Sequence[str]) -> Space:
    """The space file's trackers and those of `--tracker`, each able to start (else one line
    naming the setting to change)."""
    names = list(dict.fromkeys([*space.trackers, *added]))
    if not names:
        return space
    from tune_kd import trackers

    for name in names:
        problem = trackers.setup_problem(name)
        if problem:
            raise SpaceError(space.path, "trackers", problem)
    return dataclasses.replace(space, trackers=names)


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
        try:
            space_text, overrides = plan.planned_space(storage, name)
        except plan.PlanError as error:
            raise ConfigError("--resume", str(error)) from None
        space = spaces.load_text(space_text, args.space, overrides)
    space = with_trackers(space, args.tracker)
    return space, storage, name, space_text, overrides


def load_datasets(space: Space) -> dict[str, datasets.Arrays]:
    """Every dataset the plan trains on, loaded once here, keyed by `Config.data_key`."""
    from tune_kd.train import load_data

    unique = {t.config.data_key: t.config for t in space.trials}
    return {key: load_data(config) for key, config in unique.items()}


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        space, storage, name, space_text, overrides = prepare(args)
        if args.resume:
            print(f"resuming {storage.uri_of(name)}")
        if args.dry_run:
            print(describe_plan(space))
            return 0
        data = load_datasets(space)
    except (SpaceError, ConfigError, datasets.DatasetUnavailable) as error:
        return cli.fail(error)
    local = start_ray(args.address)
    launcher = tuner.Launcher(
        storage,
        data,
        effective_resources(space.resources, local),
        args.max_concurrent,
        args.max_failures,
    )
    with tuner.StopSignals() as stop:
        prepared = None
        try:
            prepared = train_first(launcher, space, stop)
        except RuntimeError as error:
            if stop.received is None:
                print(f"error: {error}", file=sys.stderr)
                return 1
        if prepared is None:  # the finished teachers and stage-1 runs are cached; no trial started
            print(
                "interrupted: while training the teachers or stage-1 runs first; "
                "run the same command again"
            )
            return stop.exit_status()
        space, states = prepared
        return run_sweep(args, launcher, space, name, space_text, overrides, stop, states)


def train_first(
    launcher: tuner.Launcher, space: Space, stop: tuner.StopSignals
) -> tuple[Space, dict[str, Any]] | None:
    """Train what the trials need and the cache lacks, each kind as an experiment of its own:
    the teachers, then the stage-1 runs (which distil from them). The space reading both from
    the cache, and every teacher's weights; None when a signal stopped it. A run that failed
    raises RuntimeError."""
    storage = launcher.storage
    teachers.train_missing(space.teachers, storage, functools.partial(launcher.fit_alone, space))
    if stop.received is not None:
        return None
    space = space.with_teacher_checkpoints(teachers.cached_checkpoints(space.teachers, storage))
    states = teachers.load_states(space.teachers, storage)
    train = functools.partial(
        launcher.fit_alone, space, teacher_states=states, results=tuner.final_runs
    )
    stage1.train_missing(space, storage, train)
    if stop.received is not None:
        return None
    return space.with_stage1_runs(stage1.cached_runs(space.stage1, storage)), states


def run_sweep(
    args: argparse.Namespace,
    launcher: tuner.Launcher,
    space: Space,
    name: str,
    space_text: str,
    overrides: dict[str, Any],
    stop: tuner.StopSignals,
    states: dict[str, Any],
) -> int:
    """Run or continue the experiment `name` (its trials reading what was trained first, the
    teachers' weights `states`) until every trial ends or a signal stops it; the results'
    tables, then the exit status (a stop's ends in the line that continues it)."""
    storage = launcher.storage
    if args.resume:
        results = launcher.restore(space, name, states).fit()
    else:
        plan.write_plan(storage, name, space, space_text, overrides, launcher.resources)
        try:
            results = launcher.tuner(space, name, states).fit()
        except BaseException:
            forget_unstarted(storage, name)
            raise
    trained = tuner.final_students(results, space)
    teachers.cache_finished([t.config for t in space.trials], trained, storage)
    report = report_results(storage, name)
    statuses = report.experiment.trials["status"]
    if statuses.isin(UNFINISHED).any():  # stopped by a signal (Tune's SIGUSR1 is not seen here)
        finished = int(statuses.isin(FINISHED).sum())
        print(
            f"interrupted: {finished} of {len(statuses)} trials finished; continue with:"
            f" python -m tune_kd.run --space {args.space} --name {name} --resume"
        )
        return stop.exit_status()
    if report.failures:
        print(f"error: {len(report.failures)} of {space.planned} trials failed", file=sys.stderr)
        return 1
    return 0


def report_results(storage: Storage, name: str) -> Any:
    """The tables and plots of the experiment, and where they are; the `analysis.SweepReport`."""
    from tune_kd import analysis

    report = analysis.write_report(storage.uri_of(name))
    print()
    print(analysis.format_summary(report.summary, report.metric, report.files, report.failures))
    return report


if __name__ == "__main__":
    sys.exit(main())
