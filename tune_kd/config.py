"""Every knob of one training run, in one place.

A run is described by a flat mapping of the keys below. The same keys are used by
`python -m tune_kd.train --config`, by the search-space files of a sweep, and by `--set key=value`
overrides, and the resolved configuration is written beside every run's metrics.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tune_kd import distillers, models

DATASETS = ("cifar100", "cifar10", "synthetic")
PRECISIONS = ("auto", "bf16", "fp32")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")

# Students the paper trains at lr 0.01 instead of 0.05.
LOW_LR_FAMILIES = ("mobilenetv2", "shufflenet")

# Keys that say where and how fast a run executes, not what it computes (bf16 aside).
EXECUTION_KEYS = (
    "cuda_graphs",
    "data_dir",
    "download",
    "device",
    "precision",
    "channels_last",
    "compile",
    "eval_batch_size",
    "fuse_students",
)

# Keys that choose the data a run trains and evaluates on.
DATA_KEYS = (
    "dataset",
    "data_dir",
    "download",
    "val_size",
    "synthetic_classes",
    "synthetic_train_size",
    "synthetic_test_size",
)

# Keys a group of students must share to be fed by one teacher pass: together they fix the
# batches, the augmentations and the teacher's outputs.
SHARED_KEYS = tuple(
    dict.fromkeys(
        (
            *DATA_KEYS,
            *EXECUTION_KEYS,
            "teacher",
            "teacher_checkpoint",
            "extra_teachers",
            "extra_teacher_checkpoints",
            "epochs",
            "batch_size",
            "seed",
        )
    )
)

# Keys without effect under each method: refused in its trials, left out of their labels so tables
# do not split on them, and out of a teacher recipe's hash.
UNUSED_BY_METHOD = {name: distillers.unused_keys(name) for name in distillers.names()}


class ConfigError(ValueError):
    """A configuration value that cannot be used; `key` names the offending key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"key '{key}': {message}")
        self.key = key
        self.detail = message


def _opt(default: Any, help: str, **checks: Any) -> Any:
    return field(default=default, metadata={"help": help, **checks})


def _list(default: list, help: str, **checks: Any) -> Any:
    return field(default_factory=lambda: list(default), metadata={"help": help, **checks})


@dataclass(frozen=True)
class _Keys:
    """The keys every method shares; `Config` adds each method's own (`tune_kd.distillers`)."""

    # data
    dataset: str = _opt("cifar100", "cifar100, cifar10 or synthetic", choices=DATASETS)
    data_dir: str | None = _opt(
        None, "dataset folder (default $TUNE_KD_DATA or ~/.cache/tune_kd/data)"
    )
    download: bool = _opt(True, "download CIFAR when its files are missing")
    val_size: int = _opt(
        0, "train images held out for evaluation (0: evaluate on the test set)", low=0
    )
    synthetic_classes: int = _opt(10, "classes of the synthetic dataset", low=2)
    synthetic_train_size: int = _opt(2000, "training images of the synthetic dataset", low=1)
    synthetic_test_size: int = _opt(500, "test images of the synthetic dataset", low=1)
    # models
    teacher: str | None = _opt(None, "teacher architecture (every method but student)", model=True)
    teacher_checkpoint: str | None = _opt(None, "teacher weights, RepDistiller/SimKD format")
    extra_teachers: list[str] = _list(
        [], "architectures of further teachers, after `teacher` (multi-teacher methods)", model=True
    )
    extra_teacher_checkpoints: list[str] = _list(
        [], "weights of each extra teacher, in the order of extra_teachers"
    )
    student: str = _opt("resnet8x4", "student architecture", model=True)
    # method
    method: str = _opt(
        "simkd",
        "training method: " + ", ".join(distillers.names()),
        choices=distillers.names(),
    )
    teacher_correct_only: bool = _opt(
        False, "leave samples the teacher gets wrong out of distillation"
    )
    temperature: float = _opt(
        4.0, "softmax temperature T of the kd and kl losses", low=0, open_low=True
    )
    ce_weight: float | None = _opt(
        None, "cross-entropy weight (default: the method's, 1; 0 for simkd)", low=0
    )
    kd_weight: float | None = _opt(
        None, "weight of the KL term on the logits (default: the method's, 1; 0 for simkd)", low=0
    )
    feat_weight: float | None = _opt(
        None, "weight of the method's own term (default: the method's, as in the paper)", low=0
    )
    # optimisation: the paper's recipe
    epochs: int = _opt(240, "training epochs", low=1)
    batch_size: int = _opt(64, "mini-batch size", low=1)
    lr: float | None = _opt(
        None,
        "initial learning rate (default 0.05; 0.01 for MobileNet and ShuffleNet students)",
        low=0,
        open_low=True,
    )
    momentum: float = _opt(0.9, "SGD momentum", low=0, high=1)
    nesterov: bool = _opt(False, "Nesterov momentum (the official code uses plain momentum)")
    weight_decay: float = _opt(5e-4, "SGD weight decay", low=0)
    lr_decay_epochs: list[int] = _list(
        [150, 180, 210], "epochs after which the lr is multiplied", low=1
    )
    lr_decay_rate: float = _opt(0.1, "lr multiplier at each decay epoch", low=0, open_low=True)
    seed: int = _opt(0, "seeds the student's initialisation and the batches", low=0)
    # execution
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    precision: str = _opt(
        "auto", "auto (bf16 on CUDA, fp32 on the CPU), bf16 or fp32", choices=PRECISIONS
    )
    channels_last: bool = _opt(True, "channels_last memory format on CUDA")
    compile: str = _opt(
        "off",
        "torch.compile mode on CUDA: off, default, reduce-overhead (CUDA graphs) or max-autotune",
        choices=COMPILE_MODES,
    )
    cuda_graphs: bool = _opt(
        True, "replay each full training step as one captured CUDA graph (CUDA only)"
    )
    eval_batch_size: int = _opt(1000, "batch size of evaluation", low=1)
    fuse_students: bool = _opt(
        False,
        "train a group's students of one architecture and projector as one fused model, not "
        "one after another (measured slower on a CPU and on an H200; not with compile)",
    )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Config:
        """Validate `values` (unknown keys, types, choices, ranges) and build a Config."""
        config = cls(**{key: check_key(key, value) for key, value in values.items()})
        config.check_consistency()
        return config

    @property
    def num_classes(self) -> int:
        """Classes of the dataset, known without loading it."""
        return {"cifar100": 100, "cifar10": 10}.get(self.dataset, self.synthetic_classes)

    @property
    def data_key(self) -> str:
        """Names the data a run uses: runs with equal keys can share one loaded copy."""
        return json.dumps({key: getattr(self, key) for key in DATA_KEYS}, sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Config:
        return self.from_dict({**self.to_dict(), **changes})

    def check_consistency(self) -> None:
        """Rules that involve more than one key."""
        method = distillers.get(self.method)
        if method.uses_teacher and self.teacher is None:
            raise ConfigError("teacher", f"method '{self.method}' needs a teacher architecture")
        if self.teacher_correct_only and not (method.uses_teacher and method.per_sample):
            able = [
                name
                for name in distillers.names()
                if distillers.get(name).uses_teacher and distillers.get(name).per_sample
            ]
            raise ConfigError("teacher_correct_only", f"needs method {', '.join(able)}")
        extra = self.extra_teacher_checkpoints
        if extra and len(extra) != len(self.extra_teachers):
            raise ConfigError(
                "extra_teacher_checkpoints",
                f"{len(extra)} paths for {len(self.extra_teachers)} extra teachers",
            )
        expected = {"single": 1, "multi": 2}.get(self.projector)
        if self.projector_weights is not None and expected not in (
            None,
            len(self.projector_weights),
        ):
            raise ConfigError("projector_weights", f"projector '{self.projector}' takes {expected}")
        if not self.device.startswith(("auto", "cpu", "cuda")):
            raise ConfigError("device", f"expected auto, cpu, cuda or cuda:N, got '{self.device}'")
        decays = self.lr_decay_epochs
        if decays != sorted(set(decays)):
            raise ConfigError("lr_decay_epochs", f"must be increasing, got {decays}")
        if decays and decays[-1] > self.epochs:
            raise ConfigError(
                "lr_decay_epochs",
                f"{decays[-1]} is beyond the last epoch ({self.epochs}): "
                "give decay epochs within the run",
            )


def _method_field(method: str, key: distillers.Key) -> tuple[str, Any, Any]:
    help = f"{key.help} ({method})"
    if isinstance(key.default, list):
        spec = _list(key.default, help, **key.rules)
    else:
        spec = _opt(key.default, help, **key.rules)
    return key.name, key.type, spec


Config = dataclasses.make_dataclass(
    "Config",
    [_method_field(method, key) for method, key in distillers.method_keys()],
    bases=(_Keys,),
    frozen=True,
    namespace={
        "__doc__": """One training run: the shared keys and every method's own.
    `None` means "chosen by `resolve`" where the help says so."""
    },
)
Config.__module__ = __name__

KEYS = tuple(f.name for f in dataclasses.fields(Config))
_RULES = {f.name: f.metadata for f in dataclasses.fields(Config)}
_TYPES = typing.get_type_hints(Config)


def check_key(key: str, value: Any, where: str | None = None) -> Any:
    """Check a value of the configuration key `key`; errors name `where` (default: the key)."""
    if key not in _RULES:
        raise ConfigError(where or key, f"unknown key{suggest(key, KEYS)}")
    return check_value(where or key, value, _TYPES[key], _RULES[key])


def check_used(given: Iterable[str], methods: Iterable[str]) -> None:
    """Refuse a key that was given for trials none of whose `methods` reads it (a teacher given
    for the student alone is let be: one file often serves a baseline and the methods)."""
    methods = sorted(set(methods))
    for key in given:
        if key in ("teacher", "teacher_checkpoint"):
            continue
        if methods and all(key in UNUSED_BY_METHOD[m] for m in methods):
            users = [m for m in distillers.names() if key not in UNUSED_BY_METHOD[m]]
            raise ConfigError(
                key,
                f"has no effect under method {' or '.join(methods)} (a key of {', '.join(users)})",
            )


def resolve(config: Config) -> Config:
    """Fill the automatic choices: learning rate, cross-entropy weight, device and precision."""
    changes: dict[str, Any] = {}
    if config.lr is None:
        low = models.family(config.student) in LOW_LR_FAMILIES
        changes["lr"] = 0.01 if low else 0.05
    for weight, default in distillers.get(config.method).defaults.items():
        if getattr(config, weight) is None:
            changes[weight] = default
    device = config.device
    if device == "auto":
        device = changes["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    on_cuda = device.startswith("cuda")
    if config.precision == "auto" or (config.precision == "bf16" and not on_cuda):
        changes["precision"] = "bf16" if on_cuda else "fp32"
    if not on_cuda:
        changes.update(compile="off", channels_last=False, cuda_graphs=False)
    else:
        if config.compile == "reduce-overhead":  # torch.compile captures its own graphs
            changes["cuda_graphs"] = False
        if config.compile != "off":  # compiled students run one after another
            changes["fuse_students"] = False
    return dataclasses.replace(config, **changes)


def check_value(key: str, value: Any, kind: Any, rules: Mapping[str, Any]) -> Any:
    """Check one value against its type and rules; return it in its canonical type."""
    if value is None:
        if _allows_none(kind):
            return None
        raise ConfigError(key, "a value is required")
    base = _without_none(kind)
    if typing.get_origin(base) is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"expected a list, got {value!r}")
        item = typing.get_args(base)[0]
        return [_check_scalar(key, v, item, rules) for v in value]
    return _check_scalar(key, value, base, rules)


def _check_scalar(key: str, value: Any, kind: type, rules: Mapping[str, Any]) -> Any:
    value = _coerce(key, value, kind)
    if "choices" in rules and value not in rules["choices"]:
        choices = ", ".join(str(c) for c in rules["choices"])
        raise ConfigError(key, f"expected one of {choices}, got {value!r}")
    if rules.get("model") and value not in models.names():
        raise ConfigError(key, f"unknown model '{value}'{suggest(value, models.names())}")
    low, high = rules.get("low"), rules.get("high")
    if low is not None and (value < low or (rules.get("open_low") and value == low)):
        bound = f"> {low}" if rules.get("open_low") else f">= {low}"
        raise ConfigError(key, f"expected a value {bound}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(key, f"expected a value <= {high}, got {value!r}")
    return value


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if kind is float:
        # YAML 1.1 reads `5e-4` (no dot) as a string: accept numeric strings for float keys.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(key, f"expected a number, got {value!r}") from None
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(key, f"expected a finite number, got {value!r}")
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {value!r}")
    return value


def _allows_none(kind: Any) -> bool:
    return isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind)


def _without_none(kind: Any) -> Any:
    if isinstance(kind, types.UnionType):
        return next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def suggest(word: str, candidates: Any) -> str:
    """'; did you mean a, b?' for the candidates close to `word`, else nothing."""
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def describe() -> str:
    """A table of every key, its default and what it does (for `--help`)."""
    rows = []
    for f in dataclasses.fields(Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append(f"  {f.name:<22} {default!s:<14} {f.metadata['help']}")
    return "\n".join(rows)
