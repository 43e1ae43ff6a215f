"""Stage 1 of method `sequential`: the SimKD runs a sweep's sequential trials start from, trained
before them and cached.

A sequential trial without `sequential_from` starts from the SimKD run of its own configuration
(`sequential.stage1_config`: method simkd, the same teacher, student, seed and training keys). A
sweep trains the missing ones after its teachers and before its trials, as one experiment
(`stage1-<time>`), and caches each one's final run checkpoint under the storage by a hash of its
configuration and its teacher (`stage1/<teacher>-<student>-<hash>/checkpoint.pt`, a run folder as
`tune_kd.train` writes it), where later sweeps find it. Trials of one stage-1 configuration (e.g.
both `sequential_input` values of a pair and seed) share one run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tune_kd import teachers
from tune_kd.config import Config
from tune_kd.distillers.sequential import CHECKPOINT_NAME, stage1_config
from tune_kd.storage import Storage

if TYPE_CHECKING:
    from tune_kd.space import Space

CACHE_FOLDER = "stage1"


@dataclass(frozen=True)
class Stage1Need:
    """The SimKD run some sequential trials start from: its configuration (its teacher's file
    set only once the teacher is cached, when it is trained first) and the `TeacherNeed.key` of
    its teacher."""

    config: Config
    teacher_key: str

    @property
    def hash(self) -> str:
        """What the run computes (`teachers.recipe_hash`), its teacher named by its key."""
        return teachers.recipe_hash(
            dataclasses.replace(self.config, teacher_checkpoint=self.teacher_key)
        )

    @property
    def key(self) -> str:
        """How trials name the run they start from."""
        return f"stage1:{self.hash}"

    @property
    def label(self) -> str:
        return f"{self.config.teacher} -> {self.config.student} seed {self.config.seed}"


def needed(
    configs: Sequence[Config], teacher_keys: Sequence[str | None]
) -> list[Stage1Need | None]:
    """The stage-1 run each configuration starts from (None: not a sequential trial, or one
    given its `sequential_from`); `teacher_keys` are the configurations' `TeacherNeed.key`s.
    Configurations of one stage-1 run share one Stage1Need."""
    found: dict[str, Stage1Need] = {}
    needs: list[Stage1Need | None] = []
    for config, teacher_key in zip(configs, teacher_keys):
        if config.method != "sequential" or config.sequential_from is not None:
            needs.append(None)
            continue
        assert teacher_key is not None  # the method distils from a teacher
        need = Stage1Need(stage1_config(config), teacher_key)
        needs.append(found.setdefault(need.key, need))
    return needs


def cache_parts(need: Stage1Need) -> tuple[str, str, str]:
    """Where a stage-1 run's checkpoint is cached: a run folder named by its pair and hash."""
    folder = f"{need.config.teacher}-{need.config.student}-{need.hash}"
    return CACHE_FOLDER, folder, CHECKPOINT_NAME


def cached_runs(needs: Sequence[Stage1Need], storage: Storage) -> dict[str, str]:
    """Where each stage-1 run's checkpoint is (or will be) cached, by `Stage1Need.key`."""
    return {n.key: storage.uri_of(*cache_parts(n)) for n in needs}


def train_missing(
    space: Space,
    storage: Storage,
    train: Callable[[str, list[Config]], Sequence[bytes | None]],
) -> None:
    """Train the stage-1 runs of `space` (reading their teachers' files) not yet in the cache,
    and cache each one's final run checkpoint with its configuration
    (`teachers.train_and_cache`: `train` returns each run's checkpoint)."""
    missing = [
        teachers.TrainedFirst(n.label, n.config, cache_parts(n))
        for n in space.stage1
        if not storage.exists(*cache_parts(n))
    ]
    teachers.train_and_cache("stage-1 SimKD run", "stage1", missing, storage, train)
