"""Teachers: which ones a sweep needs, where trained ones are cached, and training the missing ones.

A distilling trial reads its teacher from a checkpoint file (its `teacher_checkpoint`, or the space
file's `teacher_checkpoints` by architecture) or, with `teacher_train`, from a teacher trained
first by that recipe: the trial's data, cross-entropy, and the recipe's keys. A multi-teacher
method reads its further teachers (`extra_teachers`) the same way, each from its own file
(`extra_teacher_checkpoints`) or trained first with its own seed. A trained teacher is
cached under the storage by a hash of its recipe, in the field's layout
(`teachers/<arch>_vanilla-<hash>/ckpt_epoch_<E>.pth`), so that later sweeps, and `tune_kd.train` of
one of their trials, reuse it; so is a sweep's own cross-entropy run whose configuration is such a
recipe. A sweep trains missing teachers as Tune trials, `tune_kd.train` in its own process. The
stage-1 runs of method sequential (`tune_kd.stage1`) are trained and cached the same way
(`train_and_cache`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from tune_kd import distillers, models
from tune_kd.cli import first_line
from tune_kd.config import (
    DATA_KEYS,
    EXECUTION_KEYS,
    UNUSED_BY_METHOD,
    Config,
    ConfigError,
    resolve,
)
from tune_kd.storage import Storage

CACHE_FOLDER = "teachers"


@dataclass(frozen=True)
class TeacherNeed:
    """A teacher some trials distil from: a checkpoint file, or a recipe to train it first."""

    arch: str
    checkpoint: str | None = None
    recipe: Config | None = None

    @property
    def key(self) -> str:
        """Where trials find its weights: the checkpoint path, or the recipe's hash."""
        return self.checkpoint if self.checkpoint else f"recipe:{recipe_hash(self.recipe)}"


# ----------------------------------------------------------------------------- what a space needs


def needed(configs: Sequence[Config], checkpoints: Any, recipe: Any) -> list[list[TeacherNeed]]:
    """The teachers each configuration distils from, first to last (none: a student trained
    alone; the first teacher, then its `extra_teachers` for a method that reads them), each
    resolved to a readable checkpoint or a recipe; configurations with one teacher share one
    TeacherNeed.

    `checkpoints` and `recipe` are the space file's `teacher_checkpoints` (architecture -> path)
    and `teacher_train` (training keys), each None when the file has none. An extra teacher's file
    is its `extra_teacher_checkpoints` entry, else the architecture's; trained first, teacher k
    (0: the first) is trained with the recipe's seed plus k, so that teachers of one architecture
    are different networks. A checkpoint is loaded once, checked against the first configuration
    that needs it."""
    paths = checkpoints or {}
    if not isinstance(paths, dict):
        raise ConfigError("teacher_checkpoints", "expected a mapping of architecture: path")
    if recipe is not None and not isinstance(recipe, dict):
        raise ConfigError(
            "teacher_train", "expected a mapping of training keys ({} for the paper's)"
        )
    found: dict[str, TeacherNeed] = {}
    needs: list[list[TeacherNeed]] = []
    for config in configs:
        own = []
        for index, (arch, given, key) in enumerate(teachers_of(config)):
            need = _need(config, index, arch, given or paths.get(arch), recipe)
            if need.key not in found:
                if need.checkpoint:
                    where = key if given else f"teacher_checkpoints.{arch}"
                    check_checkpoint(need.checkpoint, arch, config, where)
                found[need.key] = need
            if any(n.key == need.key for n in own):
                raise ConfigError(
                    "extra_teacher_checkpoints",
                    f"teacher {index + 1} ({arch}) is the same file as an earlier teacher: "
                    "give each teacher its own checkpoint",
                )
            own.append(found[need.key])
        needs.append(own)
    return needs


def teachers_of(config: Config) -> list[tuple[str, str | None, str]]:
    """(architecture, checkpoint given in the configuration, its key) of each teacher `config`
    distils from, first to last: none for a student alone, the extra teachers only for a method
    that reads them."""
    method = distillers.get(config.method)
    if not method.uses_teacher:
        return []
    first = [(config.teacher, config.teacher_checkpoint, "teacher_checkpoint")]
    if "extra_teachers" not in method.uses:
        return first
    files = config.extra_teacher_checkpoints or [None] * len(config.extra_teachers)
    return first + [
        (arch, path, f"extra_teacher_checkpoints[{i}]")
        for i, (arch, path) in enumerate(zip(config.extra_teachers, files))
    ]


def _need(
    config: Config, index: int, arch: str, checkpoint: str | None, recipe: Any
) -> TeacherNeed:
    if checkpoint is not None:
        return TeacherNeed(arch, checkpoint=str(checkpoint))
    if recipe is None:
        raise ConfigError(
            "teacher_checkpoints",
            f"no checkpoint for teacher '{arch}': "
            "list its path here, or give teacher_train to train it first",
        )
    return TeacherNeed(arch, recipe=teacher_recipe(config, recipe, arch, index))


def teacher_recipe(
    config: Config, recipe: Mapping[str, Any], arch: str | None = None, index: int = 0
) -> Config:
    """The training run of `config`'s teacher number `index` (0: the first, of architecture
    `config.teacher`; else `arch`): the trial's data, cross-entropy, and the recipe's keys, its
    seed raised by `index`."""
    values = {k: getattr(config, k) for k in DATA_KEYS}
    try:
        trained = Config.from_dict(
            {**values, **recipe, "method": "student", "student": arch or config.teacher}
        )
    except ConfigError as error:
        raise ConfigError(f"teacher_train.{error.key}", error.detail) from None
    return dataclasses.replace(trained, seed=trained.seed + index) if index else trained


def recipe_hash(recipe: Config | None) -> str:
    """A short hash of what a run trained first (a teacher, a stage-1 run) computes, not where
    it runs: its resolved keys, without those its method does not read."""
    assert recipe is not None
    resolved = resolve(dataclasses.replace(recipe, device="cpu"))
    unused = (*EXECUTION_KEYS, *UNUSED_BY_METHOD[recipe.method])
    values = {k: v for k, v in resolved.to_dict().items() if k not in unused}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def check_checkpoint(path: str, arch: str, config: Config, key: str) -> None:
    """Load a teacher on the CPU: an unreadable or mismatched file (another architecture, another
    number of classes than `config`'s dataset) fails, naming `key`, before anything runs."""
    try:
        model = models.load_checkpoint(path, name=arch)
    except ValueError as error:
        raise ConfigError(key, first_line(error)) from None
    classes, out = config.num_classes, models.num_classes(model)
    if out != classes:
        raise ConfigError(key, f"{path} has {out} classes but {config.dataset} has {classes}")


# ----------------------------------------------------------------------------- the cache


def cache_parts(need: TeacherNeed) -> tuple[str, str, str]:
    """Where a recipe's teacher is cached: the field's `<arch>_vanilla/ckpt_epoch_<E>.pth` layout,
    with the recipe's hash in the folder name."""
    assert need.recipe is not None
    folder = f"{need.arch}_vanilla-{recipe_hash(need.recipe)}"
    return CACHE_FOLDER, folder, f"ckpt_epoch_{need.recipe.epochs}.pth"


def cached_checkpoints(needs: Sequence[TeacherNeed], storage: Storage) -> dict[str, str]:
    """Where each recipe's teacher is (or will be) cached, by `TeacherNeed.key`."""
    return {n.key: storage.uri_of(*cache_parts(n)) for n in needs if n.recipe}


def train_missing(
    needs: Sequence[TeacherNeed],
    storage: Storage,
    train: Callable[[str, list[Config]], Sequence[bytes | None]],
) -> None:
    """Train the recipe teachers not yet in the cache, and cache them with their recipe
    (`train_and_cache`)."""
    missing = [
        TrainedFirst(n.arch, n.recipe, cache_parts(n))
        for n in needs
        if n.recipe and not storage.exists(*cache_parts(n))
    ]
    train_and_cache("teacher", "teachers", missing, storage, train)


@dataclass(frozen=True)
class TrainedFirst:
    """A run a sweep trains before its trials: its name in messages, its configuration, and
    where its result is cached under the storage."""

    label: str
    config: Config
    parts: tuple[str, ...]


def train_and_cache(
    kind: str,
    experiment: str,
    missing: Sequence[TrainedFirst],
    storage: Storage,
    train: Callable[[str, list[Config]], Sequence[bytes | None]],
) -> None:
    """Train `missing` (runs of one `kind`, named in the lines printed) as one experiment
    `<experiment>-<time>`, and cache each one's result with its configuration (`config.yaml`
    beside it).

    `train(experiment, configs)` runs the configurations as one experiment of that name under
    the storage and returns each one's result (None: it failed); a failure raises RuntimeError,
    with the runs cached that finished before it."""
    if not missing:
        return
    print(f"training {len(missing)} {kind}(s) first: {', '.join(m.label for m in missing)}")
    name = f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
    results = train(name, [m.config for m in missing])
    for item, result in zip(missing, results):
        if result is None:
            raise RuntimeError(f"training {kind} {item.label} failed: see {storage.uri_of(name)}")
        storage.write(result, *item.parts)
        storage.write(
            yaml.safe_dump(item.config.to_dict()).encode(), *item.parts[:-1], "config.yaml"
        )


def cache_finished(
    configs: Sequence[Config], weights: Sequence[bytes | None], storage: Storage
) -> None:
    """Cache each finished cross-entropy run (`weights` None: it did not finish) as the teacher
    of its recipe, unless that teacher is cached already: the paper's recipe runs double as
    teachers for later sweeps."""
    for config, trained in zip(configs, weights):
        if trained is None or config.method != "student":
            continue
        need = TeacherNeed(config.student, recipe=config)
        if not storage.exists(*cache_parts(need)):
            storage.write(trained, *cache_parts(need))


def load_states(needs: Sequence[TeacherNeed], storage: Storage) -> dict[str, dict[str, np.ndarray]]:
    """The weights of every teacher, keyed as the trials' `teacher_checkpoint`: a file's path, or
    the cache's URI of a recipe's teacher."""
    states = {}
    for need in needs:
        if need.checkpoint:
            states[need.checkpoint] = numpy_state(
                models.load_checkpoint(need.checkpoint, need.arch)
            )
            continue
        parts = cache_parts(need)
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / parts[-1]
            local.write_bytes(storage.read(*parts))
            model = models.load_checkpoint(local, name=need.arch)
        states[storage.uri_of(*parts)] = numpy_state(model)
    return states


def numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
