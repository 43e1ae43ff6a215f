"""One training run, end to end, without Ray.

    python -m tune_kd.train --config search_spaces/quickstart.yaml --set loss=l2 --set lr=0.05 \\
        --set seed=0
    python -m tune_kd.train --method simkd --teacher resnet32x4 \\
        --teacher-checkpoint resnet32x4_vanilla/ckpt_epoch_240.pth --student resnet8x4

From a search-space file, `--set` picks one trial, which runs as the sweep's trial of those values
does: with the threads of the file's `resources.cpu` (`tune_kd.space.Resources.threads`), and
distilling from the teacher the sweep caches (`tune_kd.teachers`), trained here first if missing.

A run trains a group of students that share one teacher pass per batch: every student of the group
sees the same batches, so the teacher's forward is computed once for all of them. A single
configuration is a group of one. Each student (a `tune_kd.member.Member`) keeps its own optimizer,
schedule, metrics and divergence handling; `report` is called once per epoch with each student's
metrics, None for one that has stopped.

Each batch is one `TrainStep`: with `fuse_students`, students of one structure train as one fused
model (`tune_kd.fused`), the others one after another; with `cuda_graphs`, a `CapturedStep`
replays the step as a CUDA graph on every full batch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import pickle
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import Tensor, nn

from tune_kd import cli, distillers, fused, losses, models
from tune_kd import data as datasets
from tune_kd.config import (
    EXECUTION_KEYS,
    KEYS,
    SHARED_KEYS,
    Config,
    ConfigError,
    check_used,
    describe,
    resolve,
)
from tune_kd.member import Member, build_member, restore, snapshot, to_device
from tune_kd.storage import DEFAULT_STORAGE, Storage
from tune_kd.teachers import check_checkpoint, teachers_of

if TYPE_CHECKING:
    from tune_kd.space import Space

# Metrics that measure the machine rather than the training: they differ between identical runs.
TIMING_METRICS = ("epoch_seconds", "images_per_second")

Report = Callable[[list[dict[str, Any] | None]], None]


def learning_rate(config: Config, epoch: int) -> float:
    """The paper's step schedule: `lr * rate^k` after k of the decay epochs (counted from 1)."""
    decays = sum(epoch > milestone for milestone in config.lr_decay_epochs)
    return config.lr * config.lr_decay_rate**decays


def load_data(config: Config) -> datasets.Arrays:
    """The dataset a configuration names. The synthetic set and any validation split are drawn
    with a fixed seed, so every trial of a sweep sees the same data whatever its own seed."""
    return datasets.load(
        config.dataset,
        config.data_dir,
        download=config.download,
        val_size=config.val_size,
        seed=0,
        synthetic_classes=config.synthetic_classes,
        synthetic_train_size=config.synthetic_train_size,
        synthetic_test_size=config.synthetic_test_size,
    )


def build_teachers(
    config: Config,
    num_classes: int,
    device: torch.device,
    states: Sequence[Mapping | None] = (),
) -> list[distillers.Teacher]:
    """The frozen teachers `config` distils from, first to last (`teachers.teachers_of`): teacher
    k from `states[k]` when given (a sweep shares it), else its checkpoint; none where `config`'s
    method uses no teacher."""
    built = []
    for index, (arch, path, key) in enumerate(teachers_of(config)):
        state = states[index] if index < len(states) else None
        if state is not None:
            model = models.create(arch, num_classes=num_classes)
            model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
        elif path is not None:
            model = models.load_checkpoint(path, name=arch)
        else:
            raise ConfigError(key, f"method '{config.method}' needs the teacher's weights")
        classes = models.num_classes(model)
        if classes != num_classes:
            raise ConfigError(
                key, f"the teacher has {classes} classes but {config.dataset} has {num_classes}"
            )
        built.append(distillers.Teacher(to_device(model, config, device)))
    return built


def train_one_epoch(run: Run, epoch: int) -> float:
    """Train every active student for one epoch; returns the seconds it took.

    Metrics accumulate on the device and are read once, at the end of the epoch.
    """
    members = run.active_members
    for m in members:
        m.distiller.train()
        for group in m.optimizer.param_groups:
            group["lr"] = learning_rate(m.config, epoch)
        # zeroed in place: a captured step adds to this very tensor
        m.sums = torch.zeros(4, device=run.device) if m.sums is None else m.sums.zero_()
        m.distiller.start_epoch(epoch)
    step = TrainStep(members, run.fused_groups(members), run.teachers, run.autocast)
    shared = run.shared
    capturable = shared.cuda_graphs and all(m.distiller.capturable for m in members)
    start = time.perf_counter()
    for batch in run.batches(epoch):
        if shared.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are free
        if capturable and len(batch.labels) == shared.batch_size:
            run.captured_step(step, batch).replay(batch)
        else:
            step(batch)
    step.finish()
    _synchronize(run.device)
    return time.perf_counter() - start


class TrainStep:
    """Trains every student of `members` one optimizer step on one batch, sharing one teacher
    pass: the students of each of `fused_groups` at once (`tune_kd.fused`), the others one after
    another. Students whose method takes full batches only skip a shorter last batch.

    Made at the start of an epoch, when the fused groups load their students' state; `finish`
    writes it back at the end."""

    def __init__(
        self,
        members: list[Member],
        fused_groups: list[fused.FusedGroup],
        teachers: Sequence[distillers.Teacher],
        autocast: Callable[[], contextlib.AbstractContextManager],
    ):
        self.members = members
        self.fused = fused_groups
        self.teachers = teachers
        self.autocast = autocast
        in_fused = {id(m) for group in self.fused for m in group.members}
        self.sequential = [m for m in members if id(m) not in in_fused]
        read = set().union(*(m.distiller.teacher_features for m in members))
        # per teacher, what any student reads of it (teachers' feature lists may differ in length)
        self.features = [{i for i in read if i < len(t.feature_shapes)} for t in teachers]
        self.needs_teacher = any(m.distiller.uses_teacher for m in members)
        self.batch_size = members[0].config.batch_size
        for group in self.fused:
            group.pull()

    @property
    def key(self) -> tuple:
        """What a captured step depends on: which students train, and at which learning rates."""
        return tuple((id(m), m.optimizer.param_groups[0]["lr"]) for m in self.members)

    def __call__(self, batch: distillers.Batch) -> None:
        with self.autocast():
            teacher_outs = (
                [
                    t(batch.images, batch.labels, features)
                    for t, features in zip(self.teachers, self.features)
                ]
                if self.needs_teacher
                else []
            )
        short = len(batch.labels) < self.batch_size
        for group in self.fused:
            if short and group.template.full_batches_only:
                continue
            outputs = group.step(batch, teacher_outs[: group.template.teacher_count], self.autocast)
            for m, out in zip(group.members, outputs):
                m.sums += _step_sums(out, batch.labels)
        for m in self.sequential:
            if short and m.distiller.full_batches_only:
                continue
            with self.autocast():
                out = m.distiller.train_step(batch, teacher_outs[: m.distiller.teacher_count])
            m.clear_grads()
            out.loss.backward()
            m.optimizer.step()
            m.sums += _step_sums(out, batch.labels)

    def finish(self) -> None:
        """Write the fused groups' state back into their students."""
        for group in self.fused:
            group.push()

    def snapshot(self) -> list:
        """Copies of everything a step changes in place."""
        return [snapshot(owner.step_state()) for owner in self._owners()]

    def restore(self, saved: list) -> None:
        """Put a `snapshot` back, with no gradients (backward then allocates them anew)."""
        for owner, before in zip(self._owners(), saved, strict=True):
            restore(owner.step_state(), before)
            owner.clear_grads()

    def _owners(self) -> list[Member | fused.FusedGroup]:
        """The holders of the state a step changes: each sequential student, each fused group."""
        return [*self.sequential, *self.fused]


class CapturedStep:
    """A `TrainStep` recorded once as a CUDA graph and replayed on every full batch: one launch
    instead of hundreds, where small CIFAR networks would otherwise wait on Python.

    Warm-up steps on the first batch create the optimizer state and let cuDNN pick its kernels;
    the students' weights, buffers, optimizer state and sums are then put back, so that training
    goes exactly as the same steps without the graph.
    """

    def __init__(self, step: TrainStep, batch: distillers.Batch):
        self.key = step.key
        self.batch = distillers.Batch(
            batch.images.clone(), batch.labels.clone(), batch.indices.clone()
        )
        device = batch.images.device
        saved = step.snapshot()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                step(self.batch)
        torch.cuda.current_stream(device).wait_stream(side)
        step.restore(saved)  # backward allocates the gradients in the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            step(self.batch)

    def replay(self, batch: distillers.Batch) -> None:
        self.batch.images.copy_(batch.images)
        self.batch.labels.copy_(batch.labels)
        self.batch.indices.copy_(batch.indices)
        self.graph.replay()


def _step_sums(out: distillers.StepOutput, labels: Tensor) -> Tensor:
    """Summed loss, top-1 and top-5 hits and samples left out of distillation, for one batch."""
    hits = losses.correct_top1_top5(out.logits.detach(), labels).float()
    dropped = (~out.kept).sum().float() if out.kept is not None else hits.new_zeros(())
    return torch.stack([out.loss.detach().float() * len(labels), hits[0], hits[1], dropped])


def evaluate(run: Run) -> list[Tensor]:
    """Loss, top-1 and top-5 hits over the evaluation split for every active student (sums)."""
    members = run.active_members
    totals = [torch.zeros(3, device=run.device) for _ in members]
    for m in members:
        m.distiller.eval()
    # no_grad rather than inference_mode: a compiled student must not be traced in both modes.
    with torch.no_grad():
        for images, labels in run.eval_batches():
            for m, total in zip(members, totals):
                with run.autocast():
                    logits = m.distiller.predict(images)
                loss = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
                total += torch.cat([loss[None], losses.correct_top1_top5(logits, labels).float()])
    return totals


def evaluate_teacher(run: Run) -> float | None:
    """Top-1 accuracy (%) of the (first) teacher on the evaluation split."""
    if run.teacher is None:
        return None
    hits = torch.zeros((), device=run.device)
    with torch.inference_mode():
        for images, labels in run.eval_batches():
            with run.autocast():
                logits = run.teacher.model(images)
            hits += (logits.argmax(dim=1) == labels).sum()
    return 100 * hits.item() / run.data.num_eval


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Run:
    """The state of one run: the data on the device, the teacher, the group of students, and the
    fused groups and captured CUDA graph that its epochs' steps reuse."""

    def __init__(
        self,
        configs: Sequence[Config | Mapping[str, Any]],
        *,
        data: datasets.Arrays | None = None,
        teacher_state: Mapping | None = None,
        extra_teacher_states: Sequence[Mapping | None] = (),
    ):
        self.configs = [
            resolve(c if isinstance(c, Config) else Config.from_dict(c)) for c in configs
        ]
        check_group(self.configs)
        shared = self.shared
        self.device = torch.device(shared.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.data = datasets.DeviceData(load_data(shared) if data is None else data, self.device)
        distilling = [c for c in self.configs if distillers.get(c.method).uses_teacher]
        # the teachers of the student that reads the most of them (the others read the first)
        source = max(distilling, key=lambda c: len(teachers_of(c)), default=None)
        self.teachers = (
            build_teachers(
                source,
                self.data.num_classes,
                self.device,
                [teacher_state, *extra_teacher_states],
            )
            if source is not None
            else []
        )
        self.members = [
            build_member(
                c, self.teachers, self.data.train_labels, self.data.num_classes, self.device
            )
            for c in self.configs
        ]
        if shared.compile != "off":
            for m in self.members:
                m.distiller.student.compile(mode=shared.compile)
            for teacher in self.teachers:
                teacher.model.compile(mode=shared.compile)
        self.epoch = 0
        self._captured: CapturedStep | None = None
        self._fused: dict[tuple[int, ...], fused.FusedGroup] = {}
        self.teacher_test_acc = evaluate_teacher(self)

    @property
    def teacher(self) -> distillers.Teacher | None:
        """The first teacher (the one single-teacher methods distil from), or None."""
        return self.teachers[0] if self.teachers else None

    @property
    def shared(self) -> Config:
        """The group's shared settings: the first configuration, whose `config.SHARED_KEYS`
        every student's configuration equals (`check_group`)."""
        return self.configs[0]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.shared.precision == "bf16":
            # A captured graph must cast the weights on every replay: no cast cache.
            cache = not self.shared.cuda_graphs
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=cache)
        return contextlib.nullcontext()

    def captured_step(self, step: TrainStep, batch: distillers.Batch) -> CapturedStep:
        """The CUDA graph of `step`, captured again when the students or their lrs change."""
        if self._captured is None or self._captured.key != step.key:
            self._captured = None  # free the old graph's memory first
            self._captured = CapturedStep(step, batch)
        return self._captured

    def fused_groups(self, members: list[Member]) -> list[fused.FusedGroup]:
        """The fused sub-groups of `members` (two or more students of one `fused.fusion_key`).
        A group lives as long as its students train together: a student that stops is dropped
        from its fused model at the next epoch, when the others are stacked anew."""
        groups: dict[tuple[int, ...], fused.FusedGroup] = {}
        if self.shared.fuse_students:
            for positions in fused.partition([m.config for m in members]):
                part = [members[i] for i in positions]
                key = tuple(id(m) for m in part)
                if len(part) > 1:
                    groups[key] = self._fused.get(key) or fused.FusedGroup(part)
        self._fused = groups
        return list(groups.values())

    @property
    def active_members(self) -> list[Member]:
        """The students still training: a diverged one stops alone."""
        return [m for m in self.members if m.active]

    @property
    def done(self) -> bool:
        return self.epoch >= self.shared.epochs or not self.active_members

    def batches(self, epoch: int) -> Iterator[distillers.Batch]:
        shared = self.shared
        for images, labels, indices in self.data.train_batches(
            epoch, shared.batch_size, shared.seed
        ):
            yield distillers.Batch(self._format(images), labels, indices)

    def eval_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in self.data.eval_batches(self.shared.eval_batch_size):
            yield self._format(images), labels

    def _format(self, images: Tensor) -> Tensor:
        if self.shared.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def train_epoch(self) -> list[dict[str, Any] | None]:
        """Train and evaluate one epoch; the metrics of each student (None once it has stopped)."""
        self.epoch += 1
        active = self.active_members
        start = time.perf_counter()
        train_seconds = train_one_epoch(self, self.epoch)
        eval_totals = evaluate(self)
        epoch_seconds = time.perf_counter() - start
        metrics: dict[int, dict[str, Any]] = {}
        for m, totals in zip(active, eval_totals):
            metrics[id(m)] = self._epoch_metrics(m, totals, train_seconds, epoch_seconds)
        return [metrics.get(id(m)) for m in self.members]

    def _epoch_metrics(
        self, m: Member, eval_totals: Tensor, train_seconds: float, epoch_seconds: float
    ) -> dict[str, Any]:
        n_train, n_eval = self.data.num_train, self.data.num_eval
        train_loss, train_top1, _, dropped = m.sums.tolist()
        test_loss, test_top1, test_top5 = eval_totals.tolist()
        test_acc = 100 * test_top1 / n_eval
        m.diverged = not (math.isfinite(train_loss) and math.isfinite(test_loss))
        if not m.diverged:
            m.best_test_acc = max(m.best_test_acc, test_acc)
        return {
            "epoch": self.epoch,
            "lr": learning_rate(m.config, self.epoch),
            "train_loss": train_loss / n_train,
            "train_acc": 100 * train_top1 / n_train,
            "test_loss": test_loss / n_eval,
            "test_acc": test_acc,
            "test_acc_top5": 100 * test_top5 / n_eval,
            "best_test_acc": m.best_test_acc,
            "dropped_samples": int(dropped),
            "epoch_seconds": epoch_seconds,
            "images_per_second": n_train / train_seconds,
            "teacher_test_acc": self.teacher_test_acc,
            "diverged": m.diverged,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: the batches of an epoch are drawn from a generator
        seeded by (seed, epoch), so the epoch number is the data order's state."""
        return {
            "epoch": self.epoch,
            "torch_rng": torch.get_rng_state(),
            "members": [
                {
                    "config": m.config.to_dict(),
                    "distiller": m.distiller.state_dict(),
                    "optimizer": m.optimizer.state_dict(),
                    "best_test_acc": m.best_test_acc,
                    "diverged": m.diverged,
                }
                for m in self.members
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = [Config.from_dict(s["config"]) for s in state["members"]]
        if [training_keys(c) for c in saved] != [training_keys(c) for c in self.configs]:
            raise ValueError("the checkpoint was written by a run with another configuration")
        self.epoch = state["epoch"]
        self._captured = None  # the optimizer's state tensors are new: capture again
        torch.set_rng_state(state["torch_rng"])
        for m, s in zip(self.members, state["members"]):
            m.distiller.load_state_dict(s["distiller"])
            m.optimizer.load_state_dict(s["optimizer"])
            m.best_test_acc = s["best_test_acc"]
            m.diverged = s["diverged"]

    def save(self, path: str | Path) -> None:
        """Write the full state atomically (a crash mid-write leaves the previous file intact)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)

    def load(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))

    def export_student(self, index: int, path: str | Path) -> None:
        """The student's weights in the RepDistiller/SimKD format, usable as a teacher."""
        m = self.members[index]
        state = {k: v.cpu() for k, v in m.distiller.student.state_dict().items()}
        torch.save({"model": state, "epoch": self.epoch, "best_acc": m.best_test_acc}, path)


def training_keys(config: Config) -> dict[str, Any]:
    """What a checkpoint must agree on to be continued: the configuration without the keys that
    only say where and how fast it runs, and without `epochs`, so a finished run can be extended."""
    return {k: v for k, v in config.to_dict().items() if k not in (*EXECUTION_KEYS, "epochs")}


def check_group(configs: Sequence[Config]) -> None:
    """Students of one run must agree on everything that fixes the batches and the teacher."""
    if not configs:
        raise ValueError("a run needs at least one configuration")
    first = configs[0].to_dict()
    for config in configs[1:]:
        for key in SHARED_KEYS:
            if config.to_dict()[key] != first[key]:
                raise ConfigError(key, "students trained in one group must share this key")


def fit(run: Run, report: Report | None = None, save: Callable[[Run], None] | None = None) -> None:
    """Train until the last epoch or until every student has diverged."""
    while not run.done:
        metrics = run.train_epoch()
        if save is not None:
            save(run)
        if report is not None:
            report(metrics)


# ----------------------------------------------------------------------------- command line

COLUMNS = (
    ("epoch", "{:>5d}"),
    ("lr", "{:>8.5f}"),
    ("train_loss", "{:>10.4f}"),
    ("train_acc", "{:>9.2f}"),
    ("test_loss", "{:>9.4f}"),
    ("test_acc", "{:>8.2f}"),
    ("test_acc_top5", "{:>13.2f}"),
    ("best_test_acc", "{:>13.2f}"),
    ("dropped_samples", "{:>15d}"),
    ("epoch_seconds", "{:>13.1f}"),
    ("images_per_second", "{:>17.0f}"),
)


def format_header() -> str:
    return "  ".join(f"{name:>{len(fmt.format(0))}}" for name, fmt in COLUMNS)


def format_row(metrics: Mapping[str, Any]) -> str:
    row = "  ".join(fmt.format(metrics[name]) for name, fmt in COLUMNS)
    return row + ("  diverged" if metrics["diverged"] else "")


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`key=value` strings, each value read as YAML (`lr=0.1`, `lr_decay_epochs=[2,4]`)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(pair, "expected key=value")
        overrides[key.strip()] = yaml_value(key.strip(), value)
    return overrides


def yaml_value(key: str, text: str) -> Any:
    """A value given on the command line, read as YAML (plain data only)."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):
        raise ConfigError(key, f"{text!r} is not a YAML value") from None


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m tune_kd.train",
        description="Train one configuration and print one line per epoch.",
        epilog="configuration keys (each also a flag, e.g. --teacher-checkpoint PATH):\n"
        + describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="a YAML file of keys, or a search-space file whose --set values pick one trial",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key"
    )
    parser.add_argument(
        "--out", type=Path, help="run folder (default runs/<time>-<method>-<student>)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the run folder's checkpoint"
    )
    parser.add_argument(
        "--storage",
        default=DEFAULT_STORAGE,
        help="where teachers trained first are cached, as for tune_kd.run (default %(default)s)",
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=1, metavar="N", help="save every N epochs"
    )
    for key in KEYS:
        parser.add_argument(
            "--" + key.replace("_", "-"), dest=f"key_{key}", metavar="VALUE", help=argparse.SUPPRESS
        )
    return parser


def config_from_args(args: argparse.Namespace) -> tuple[Config, Space | None]:
    """The one configuration the command line describes, and the space file it came from (None
    without `--config`). The flags and `--set` values apply to the file before it must describe
    one trial, so that `--set` picks one value of each swept key, as `tune_kd.run --set` does."""
    from tune_kd import space as spaces

    values: dict[str, Any] = {}
    for key in KEYS:
        flag = getattr(args, f"key_{key}")
        if flag is not None:
            values[key] = yaml_value(key, flag)
    values.update(parse_overrides(args.set))
    space = None
    if args.config is not None:
        space = spaces.load(args.config, values)
        values = space.single_trial()
    config = resolve(Config.from_dict(values))
    if space is None:
        check_used(values.keys() - {"method"}, [config.method])
    for arch, path, key in teachers_of(config):
        if path is not None:
            check_checkpoint(path, arch, config, key)
    return config, space


def cached_teachers(space: Space, storage: Storage) -> tuple[dict[str, str], dict] | None:
    """Where the sweep's cache under `storage` keeps the teachers of `space`'s one trial that
    the file trains first (`teacher_train`), by `TeacherNeed.key`, and their weights by that
    path; None when it trains none. A teacher missing from the cache is trained here first, and
    cached for later runs and sweeps; ConfigError, before anything is trained, when the storage
    cannot be written."""
    from tune_kd import teachers

    needs = [n for n in space.teachers if n.recipe is not None]
    if not needs:
        return None
    unwritable = storage.unwritable()
    if unwritable:
        raise ConfigError("--storage", unwritable)
    teachers.train_missing(needs, storage, functools.partial(train_teachers, storage))
    return teachers.cached_checkpoints(needs, storage), teachers.load_states(needs, storage)


def train_teachers(
    storage: Storage, experiment: str, recipes: Sequence[Config]
) -> list[bytes | None]:
    """Train each recipe in this process, one after another (the `train` of
    `teachers.train_missing`): each one's final weights, None for one that diverged."""
    return [train_teacher(recipe, storage, experiment) for recipe in recipes]


def train_teacher(recipe: Config, storage: Storage, experiment: str) -> bytes | None:
    """Train one teacher's recipe, printing its epochs and keeping them under the storage as
    `<experiment>/<arch>/metrics.jsonl`; its final weights (None: it diverged)."""
    rows: list[str] = []

    def report(metrics: list[dict[str, Any] | None]) -> None:
        if metrics[0] is not None:
            print(format_row(metrics[0]), flush=True)
            rows.append(json.dumps(metrics[0]) + "\n")

    print(f"teacher {recipe.student} on {recipe.dataset}, {recipe.epochs} epochs")
    print(format_header())
    run = Run([recipe])
    fit(run, report)
    storage.write("".join(rows).encode(), experiment, recipe.student, "metrics.jsonl")
    if run.members[0].diverged:
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "teacher.pth"
        run.export_student(0, path)
        return path.read_bytes()


def resume(run: Run, checkpoint: Path) -> None:
    """Continue `run` from its folder's checkpoint, or say in one line why it cannot be."""
    if not checkpoint.is_file():
        raise ConfigError("--resume", f"no checkpoint {checkpoint} to continue")
    try:
        run.load(checkpoint)
    except pickle.UnpicklingError:
        raise ConfigError(
            "--resume", f"{checkpoint} is not a checkpoint of tensors: refused to unpickle it"
        ) from None
    except (ValueError, RuntimeError, KeyError, EOFError) as error:
        reason = cli.first_line(error)
        raise ConfigError("--resume", f"{checkpoint} cannot be continued: {reason}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        config, space = config_from_args(args)
        out = (
            args.out
            or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.method}-{config.student}"
        )
        unwritable = Storage(str(out)).unwritable()
        if unwritable:
            raise ConfigError("--out", unwritable)
        states: dict[str, Any] = {}
        if space is not None:
            torch.set_num_threads(space.resources.threads)  # as the sweep's trials of this file
            cached = cached_teachers(space, Storage(args.storage))
            if cached is not None:
                paths, states = cached
                [trial] = space.with_teacher_checkpoints(paths).trials
                config = dataclasses.replace(
                    config,
                    teacher_checkpoint=trial.config.teacher_checkpoint,
                    extra_teacher_checkpoints=trial.config.extra_teacher_checkpoints,
                )
        run = Run(
            [config],
            teacher_state=states.get(config.teacher_checkpoint or ""),
            extra_teacher_states=[states.get(p) for p in config.extra_teacher_checkpoints],
        )
        checkpoint = out / "checkpoint.pt"
        if args.resume:
            resume(run, checkpoint)
    except (ValueError, datasets.DatasetUnavailable) as error:
        return cli.fail(error)
    except RuntimeError as error:  # a teacher trained first diverged
        print(f"error: {error}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    teacher = f", teacher {run.teacher_test_acc:.2f}%" if run.teacher_test_acc is not None else ""
    where = f"{config.device}, {config.precision}{teacher}"
    print(f"{config.method}: {config.student} on {config.dataset} ({where}), writing to {out}")
    print(format_header())

    def report(metrics: list[dict[str, Any] | None]) -> None:
        row = metrics[0]
        if row is None:
            return
        print(format_row(row), flush=True)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def save(run: Run) -> None:
        if run.epoch % args.checkpoint_every == 0 or run.done:
            run.save(checkpoint)

    fit(run, report, save)
    run.export_student(0, out / "student.pth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
