"""Search-space files: read safely, validate in full, and expand into trials.

A space file is a run configuration (any key of `tune_kd.config.Config`, single values) plus a few
sweep keys:

    name: study-losses
    dataset: cifar100
    teacher: resnet38x2
    student: resnet8x4
    method: simkd
    grid:                      # every combination of these values is one trial
      loss: [l2, cosine, kl]
      lr: [0.001, 0.005, 0.01, 0.05, 0.1]
      seed: [0, 1, 2]
    resources: {cpu: 2, gpu: 0.25}

`grids:` (a list of grids) runs their union. A grid axis that is not a configuration key takes
mappings, each setting several keys together: `pair: [{teacher: resnet32x4, student: vgg8}, ...]`.

The teachers the trials distil from are resolved by `tune_kd.teachers`, the stage-1 runs of
sequential trials by `tune_kd.stage1`; `tune_kd.tuner` hands the trials to Ray Tune.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tune_kd import stage1, teachers
from tune_kd.cli import first_line
from tune_kd.config import (
    KEYS,
    SHARED_KEYS,
    UNUSED_BY_METHOD,
    Config,
    ConfigError,
    check_key,
    check_used,
    check_value,
    suggest,
)
from tune_kd.stage1 import Stage1Need
from tune_kd.teachers import TeacherNeed

SCHEDULERS = ("fifo", "asha")
SEARCH_ALGORITHMS = ("grid", "optuna")
RANGE_KINDS = ("uniform", "loguniform", "randint", "choice")
# Metrics a search or a scheduler may optimise (all maximised).
METRICS = ("best_test_acc", "test_acc", "test_acc_top5")
# Experiment trackers a sweep can log to besides TensorBoard (Ray Tune's logger callbacks).
TRACKERS = ("mlflow", "wandb")
# Names of experiments: one path component under the storage, never `..` or a path.
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
# A space file holds a few hundred values; YAML aliases can make a few lines stand for billions.
MAX_VALUES = 100_000
# Trials one sweep may plan (a grid's combinations, or Optuna's samples).
MAX_TRIALS = 100_000
# Columns every trial is labelled with, swept or not, so results from different files line up.
LABELS = ("teacher", "student", "method", "loss", "projector", "lr", "seed")


class SpaceError(ValueError):
    """A search-space file that cannot be run: names the file and the key."""

    def __init__(self, path: str | Path, key: str, message: str):
        super().__init__(f"{path}: key '{key}': {message}")
        self.path = str(path)
        self.key = key


@dataclass(frozen=True)
class Resources:
    cpu: float = 1.0
    gpu: float = 0.0

    @property
    def threads(self) -> int:
        """The torch threads of one run: its whole CPUs, at least one. A sweep's trials and
        `tune_kd.train` of the same file both use it, so that a trial rerun alone computes the
        same numbers (a CPU's sums depend on how many threads split them)."""
        return max(1, int(self.cpu))


@dataclass(frozen=True)
class Scheduler:
    """FIFO runs every trial to the end; ASHA stops the worst at rungs of `grace_period` epochs
    times powers of `reduction_factor`."""

    name: str = "fifo"
    grace_period: int = 1
    reduction_factor: float = 3.0


@dataclass(frozen=True)
class Range:
    kind: str
    args: tuple


@dataclass(frozen=True)
class Search:
    algorithm: str = "grid"
    samples: int = 1
    ranges: dict[str, Range] = field(default_factory=dict)
    seed: int = 0


@dataclass(frozen=True)
class Trial:
    """One planned run: its place in the plan, the values that identify it, its configuration,
    the `TeacherNeed.key` of the teacher it distils from (None: a student trained alone) and those
    of its extra teachers (a multi-teacher method's), and the `Stage1Need.key` of the stage-1 run
    it starts from (a sequential trial's without `sequential_from`)."""

    index: int
    axes: dict[str, Any]
    config: Config
    teacher_key: str | None = None
    extra_teacher_keys: tuple[str, ...] = ()
    stage1_key: str | None = None

    @property
    def labels(self) -> dict[str, Any]:
        """The identifying columns of results tables: the standard labels and every swept axis,
        with keys that have no effect under the trial's method left empty."""
        values = self.config.to_dict()
        labels = {key: values[key] for key in LABELS} | dict(self.axes)
        for key in UNUSED_BY_METHOD[self.config.method]:
            if key in labels:
                labels[key] = None
        return labels


@dataclass
class Space:
    """A validated space file: its trials (a grid's every combination, or the one configuration
    Optuna's samples complete), the teachers and stage-1 runs they need, how the sweep runs them,
    and the `--set` values it was loaded with."""

    path: Path
    name: str
    description: str
    trials: list[Trial]
    axes: list[str]
    teachers: list[TeacherNeed]
    resources: Resources
    scheduler: Scheduler
    search: Search
    metric: str
    group_students: bool
    trackers: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    stage1: list[Stage1Need] = field(default_factory=list)

    def single_trial(self) -> dict[str, Any]:
        """The configuration of a file that describes exactly one run (for `tune_kd.train`)."""
        if self.search.algorithm != "grid" or len(self.trials) != 1:
            count = self.search.samples if self.search.algorithm != "grid" else len(self.trials)
            raise SpaceError(
                self.path,
                "grid",
                f"describes {count} trials, not one: "
                "run it with python -m tune_kd.run, or pick one with --set",
            )
        return self.trials[0].config.to_dict()

    @property
    def planned(self) -> int:
        """Trials the sweep runs: the grid's, or Optuna's samples (`trials` then holds the one
        configuration its samples complete)."""
        return self.search.samples if self.search.algorithm == "optuna" else len(self.trials)

    @property
    def sampling_base(self) -> dict[str, Any]:
        """The configuration Optuna's sampled values complete (with its teacher's checkpoint), or
        nothing for a grid, whose trials are planned in full."""
        return self.trials[0].config.to_dict() if self.search.algorithm == "optuna" else {}

    @functools.cached_property
    def groups(self) -> list[list[Trial]]:
        """Trials packed into Ray trials: one each, or with `group_students`, every trial that
        differs from another only in student-side keys in one group sharing the teacher's pass
        (students trained without a teacher apart from those with one, whose teacher's file is
        known only once it is trained). Computed once per Space (a changed space is a new Space,
        packed anew)."""
        if not self.group_students:
            return [[t] for t in self.trials]
        packed: dict[str, list[Trial]] = {}
        for trial in self.trials:
            values = trial.config.to_dict()
            files = ("teacher_checkpoint", "extra_teacher_checkpoints")
            shared = {k: values[k] for k in SHARED_KEYS if k not in files}
            shared["teacher"] = [trial.teacher_key, *trial.extra_teacher_keys]
            key = json.dumps(shared, sort_keys=True, default=str)
            packed.setdefault(key, []).append(trial)
        return list(packed.values())

    def with_teacher_checkpoints(self, checkpoints: Mapping[str, str]) -> Space:
        """This space with every trial and stage-1 run whose teachers are in `checkpoints` (by
        `TeacherNeed.key`) distilling from those files: where the teachers trained first are
        cached."""
        files = {n.key: n.checkpoint for n in self.teachers if n.checkpoint} | dict(checkpoints)
        stage1 = [
            dataclasses.replace(
                n, config=dataclasses.replace(n.config, teacher_checkpoint=files[n.teacher_key])
            )
            if n.teacher_key in files
            else n
            for n in self.stage1
        ]
        trials = [_with_files(t, files) for t in self.trials]
        return dataclasses.replace(self, trials=trials, stage1=stage1)

    def with_stage1_runs(self, runs: Mapping[str, str]) -> Space:
        """This space with every trial whose stage-1 run is in `runs` (by `Stage1Need.key`)
        starting from that checkpoint (its `sequential_from`): where the runs trained first are
        cached."""
        trials = [
            dataclasses.replace(
                t, config=dataclasses.replace(t.config, sequential_from=runs[t.stage1_key])
            )
            if t.stage1_key in runs
            else t
            for t in self.trials
        ]
        return dataclasses.replace(self, trials=trials)


SPACE_KEYS = (
    "name",
    "description",
    "grid",
    "grids",
    "teacher_train",
    "teacher_checkpoints",
    "resources",
    "scheduler",
    "search",
    "metric",
    "group_students",
    "trackers",
)


def load(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Space:
    """Read and validate a space file; `overrides` are `--set` values (a grid axis is replaced)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SpaceError(path, "-", f"cannot read the file ({error.strerror})") from None
    except UnicodeDecodeError:
        raise SpaceError(path, "-", "not a text file (UTF-8 YAML expected)") from None
    return load_text(text, path, overrides)


def load_text(text: str, path: str | Path, overrides: Mapping[str, Any] | None = None) -> Space:
    """Validate the text of a space file; `path` is where it came from, for messages."""
    path = Path(path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpaceError(path, "-", f"not valid YAML ({_yaml_problem(error)})") from None
    except RecursionError:
        raise SpaceError(path, "-", "not valid YAML (nested too deeply)") from None
    if not isinstance(raw, dict):
        raise SpaceError(path, "-", "expected a mapping of keys at the top level")
    _check_size(path, raw)
    _check_size("--set", overrides or {})
    try:
        space = _parse(path, apply_overrides(raw, overrides or {}))
    except ConfigError as error:
        raise SpaceError(path, error.key, error.detail) from None
    return dataclasses.replace(space, overrides=dict(overrides or {}))


def _check_size(where: str | Path, document: Mapping[str, Any]) -> None:
    """Refuse a document of more than MAX_VALUES values, counted as if its YAML aliases were
    expanded (a reference cycle counts without end), before anything copies or expands it. The
    count stops at the limit, so an alias bomb is refused in bounded time and memory."""
    count = 0
    for key, value in document.items():
        pending = [value]
        while pending:
            item = pending.pop()
            count += 1
            if count > MAX_VALUES:
                raise SpaceError(
                    where,
                    key,
                    f"more than {MAX_VALUES} values once YAML aliases are expanded: "
                    "a space file lists each value it sweeps",
                )
            if isinstance(item, dict):
                pending.extend(item.values())
            elif isinstance(item, list):
                pending.extend(item)


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`key=value` overrides: a swept key is replaced in every grid, `a.b` reaches into mappings."""
    raw = json.loads(json.dumps(raw, default=str))
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            section = raw.setdefault(head, {})
            if not isinstance(section, dict):
                raise SpaceError("--set", key, f"'{head}' is not a mapping")
            section[rest] = value
            continue
        grids = raw["grids"] if isinstance(raw.get("grids"), list) else [raw.get("grid") or {}]
        swept = [g for g in grids if isinstance(g, dict) and key in g]
        for grid in swept:
            grid[key] = value if isinstance(value, list) else [value]
        if not swept:
            raw[key] = value
    return raw


def _parse(path: Path, raw: dict[str, Any]) -> Space:
    config_keys = set(KEYS)
    for key in raw:
        if key not in config_keys and key not in SPACE_KEYS:
            raise ConfigError(key, f"unknown key{suggest(key, [*config_keys, *SPACE_KEYS])}")
    base = {k: v for k, v in raw.items() if k in config_keys}
    grids = _grids(raw)
    _check_trial_count(grids)
    search = _search(raw.get("search", "grid"))
    if search.algorithm == "optuna" and any(grids):
        raise ConfigError(
            "grid", "search 'optuna' samples its own trials: move the grid into search.space"
        )
    scheduler = _scheduler(raw.get("scheduler", "fifo"))
    trials = _expand(base, grids)
    given = {*base, *(k for t in trials for k in t.axes)}
    check_used(given - {"method"}, [t.config.method for t in trials])
    axes = list(dict.fromkeys(k for t in trials for k in t.axes))
    group_students = check_value("group_students", raw.get("group_students", False), bool, {})
    if group_students and scheduler.name != "fifo":
        raise ConfigError(
            "group_students",
            "students trained together cannot be stopped one by one: use scheduler fifo",
        )
    needs = teachers.needed(
        [t.config for t in trials], raw.get("teacher_checkpoints"), raw.get("teacher_train")
    )
    trials = [_distilling(trial, own) for trial, own in zip(trials, needs)]
    runs = stage1.needed([t.config for t in trials], [t.teacher_key for t in trials])
    trials = [
        dataclasses.replace(t, stage1_key=run.key) if run else t for t, run in zip(trials, runs)
    ]
    return Space(
        path=path,
        name=check_folder_name("name", check_value("name", raw.get("name", path.stem), str, {})),
        description=str(raw.get("description", "")).strip(),
        trials=trials,
        axes=axes,
        teachers=list({n.key: n for own in needs for n in own}.values()),
        resources=_resources(raw.get("resources", {})),
        scheduler=scheduler,
        search=search,
        metric=check_value("metric", raw.get("metric", "best_test_acc"), str, {"choices": METRICS}),
        group_students=group_students,
        trackers=check_value("trackers", raw.get("trackers", []), list[str], {"choices": TRACKERS}),
        stage1=list({n.key: n for n in runs if n}.values()),
    )


def _grids(raw: dict[str, Any]) -> list[dict[str, list]]:
    if "grid" in raw and "grids" in raw:
        raise ConfigError("grids", "give either grid or grids, not both")
    if "grids" in raw:
        if not isinstance(raw["grids"], list) or not raw["grids"]:
            raise ConfigError("grids", "expected a list of grids")
        named = [(f"grids[{i}]", g) for i, g in enumerate(raw["grids"])]
    else:
        named = [("grid", raw.get("grid") or {})]
    return [_grid(name, grid) for name, grid in named]


def _grid(name: str, grid: Any) -> dict[str, list]:
    if not isinstance(grid, dict):
        raise ConfigError(name, "expected a mapping of key: [values]")
    for axis, values in grid.items():
        where = f"{name}.{axis}"
        if not isinstance(values, list) or not values:
            raise ConfigError(where, "expected a non-empty list of values")
        if axis in KEYS:
            continue
        if not all(isinstance(v, dict) for v in values):
            raise ConfigError(
                where,
                f"unknown key{suggest(axis, KEYS)} (an axis that is "
                "not a configuration key takes mappings of keys)",
            )
        for bundle in values:
            for key in bundle:
                if key not in KEYS:
                    raise ConfigError(f"{where}.{key}", f"unknown key{suggest(key, KEYS)}")
    return grid


def _expand(base: dict[str, Any], grids: list[dict[str, list]]) -> list[Trial]:
    """Every combination of every grid, in file order (first axis outermost), validated."""
    trials: list[Trial] = []
    for name, grid in zip(_grid_names(grids), grids):
        axes = list(grid)
        for combination in itertools.product(*(grid[a] for a in axes)):
            swept: dict[str, Any] = {}
            for axis, value in zip(axes, combination):
                swept.update(value if isinstance(value, dict) else {axis: value})
            try:
                config = Config.from_dict({**base, **swept})
            except ConfigError as error:
                key = f"{name}.{error.key}" if error.key in swept else error.key
                raise ConfigError(key, error.detail) from None
            trials.append(Trial(len(trials), swept, config))
    return trials


def _check_trial_count(grids: list[dict[str, list]]) -> None:
    """Refuse a plan of more than MAX_TRIALS trials, counted from its axes before expanding."""
    counts = [math.prod(len(values) for values in grid.values()) for grid in grids]
    if sum(counts) > MAX_TRIALS:
        key = "grid" if len(grids) == 1 else "grids"
        raise ConfigError(key, f"plans {sum(counts)} trials, more than {MAX_TRIALS}")


def _grid_names(grids: list[dict]) -> list[str]:
    return ["grid"] if len(grids) == 1 else [f"grids[{i}]" for i in range(len(grids))]


def _distilling(trial: Trial, needs: list[TeacherNeed]) -> Trial:
    """A trial with its teachers recorded, and the files of those that have one."""
    if not needs:
        return trial
    first, *extra = needs
    trial = dataclasses.replace(
        trial, teacher_key=first.key, extra_teacher_keys=tuple(n.key for n in extra)
    )
    return _with_files(trial, {n.key: n.checkpoint for n in needs if n.checkpoint})


def _with_files(trial: Trial, checkpoints: Mapping[str, str]) -> Trial:
    """`trial` reading each of its teachers found in `checkpoints` (by key) from that file."""
    changes: dict[str, Any] = {}
    if trial.teacher_key in checkpoints:
        changes["teacher_checkpoint"] = checkpoints[trial.teacher_key]
    if trial.extra_teacher_keys and all(k in checkpoints for k in trial.extra_teacher_keys):
        changes["extra_teacher_checkpoints"] = [checkpoints[k] for k in trial.extra_teacher_keys]
    if not changes:
        return trial
    return dataclasses.replace(trial, config=dataclasses.replace(trial.config, **changes))


def check_folder_name(key: str, name: str) -> str:
    """An experiment is one folder of the storage: its name may not reach outside it."""
    if not FOLDER_NAME.fullmatch(name):
        raise ConfigError(
            key,
            f"{name!r} is not a folder name: letters, digits, '.', '_' and '-' only, "
            "starting with a letter or digit",
        )
    return name


def _resources(raw: Any) -> Resources:
    if not isinstance(raw, dict):
        raise ConfigError("resources", "expected a mapping such as {cpu: 2, gpu: 0.25}")
    for key in raw:
        if key not in ("cpu", "gpu"):
            raise ConfigError(f"resources.{key}", "unknown key; resources takes cpu and gpu")
    cpu = _number("resources.cpu", raw.get("cpu", 1), low=0, open_low=True)
    gpu = _number("resources.gpu", raw.get("gpu", 0), low=0)
    if gpu > 1 and gpu != int(gpu):
        raise ConfigError("resources.gpu", "a trial takes a fraction of one GPU or whole GPUs")
    return Resources(cpu=cpu, gpu=gpu)


def _scheduler(raw: Any) -> Scheduler:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ConfigError("scheduler", "expected fifo, asha or a mapping with a name")
    allowed = {f.name for f in dataclasses.fields(Scheduler)}
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"scheduler.{key}", f"unknown key{suggest(key, allowed)}")
    name = check_value("scheduler.name", raw.get("name", "fifo"), str, {"choices": SCHEDULERS})
    return Scheduler(
        name=name,
        grace_period=check_value(
            "scheduler.grace_period", raw.get("grace_period", 1), int, {"low": 1}
        ),
        reduction_factor=_number(
            "scheduler.reduction_factor", raw.get("reduction_factor", 3), low=1, open_low=True
        ),
    )


def _search(raw: Any) -> Search:
    if isinstance(raw, str):
        raw = {"algorithm": raw}
    if not isinstance(raw, dict):
        raise ConfigError("search", "expected grid, optuna or a mapping with an algorithm")
    allowed = ("algorithm", "samples", "space", "seed")
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"search.{key}", f"unknown key{suggest(key, allowed)}")
    algorithm = check_value(
        "search.algorithm", raw.get("algorithm", "grid"), str, {"choices": SEARCH_ALGORITHMS}
    )
    ranges = _ranges(raw.get("space") or {})
    if algorithm == "optuna" and not ranges:
        raise ConfigError(
            "search.space", "optuna needs ranges, e.g. lr: {loguniform: [0.001, 0.1]}"
        )
    if algorithm == "grid" and ranges:
        raise ConfigError("search.space", "ranges need search algorithm optuna")
    return Search(
        algorithm=algorithm,
        samples=check_value(
            "search.samples", raw.get("samples", 1), int, {"low": 1, "high": MAX_TRIALS}
        ),
        ranges=ranges,
        seed=check_value("search.seed", raw.get("seed", 0), int, {"low": 0}),
    )


def _ranges(raw: Any) -> dict[str, Range]:
    if not isinstance(raw, dict):
        raise ConfigError("search.space", "expected a mapping of key: {kind: [args]}")
    ranges = {}
    for key, spec in raw.items():
        where = f"search.space.{key}"
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(where, f"expected one of {', '.join(RANGE_KINDS)}: [args]")
        [(kind, args)] = spec.items()
        if kind not in RANGE_KINDS:
            raise ConfigError(where, f"expected one of {', '.join(RANGE_KINDS)}, got '{kind}'")
        if not isinstance(args, list) or (kind != "choice" and len(args) != 2):
            raise ConfigError(
                where, f"{kind} takes [low, high]" if kind != "choice" else "choice takes a list"
            )
        args = [check_key(key, a, where) for a in args]
        if kind != "choice" and not args[0] < args[1]:
            raise ConfigError(where, "expected low < high")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(where, "loguniform needs low > 0")
        ranges[key] = Range(kind, tuple(args))
    return ranges


def _number(key: str, value: Any, low: float, open_low: bool = False) -> float:
    return check_value(key, value, float, {"low": low, "open_low": open_low})


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What the YAML parser found wrong, and the line where it found it."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}"
    return first_line(error)
