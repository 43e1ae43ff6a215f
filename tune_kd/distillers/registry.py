"""The methods by name: `register` adds one, `get` and `names` find them, `create` builds one
around a student. Everything about methods that other modules need derives from here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor, nn

from tune_kd.distillers.base import DISTILLATION_KEYS, Distiller, Key, Teacher

if TYPE_CHECKING:
    from tune_kd.config import Config

_METHODS: dict[str, type[Distiller]] = {}


def register(cls: type[Distiller]) -> type[Distiller]:
    """Class decorator: make a method known by its `name`."""
    taken = {k.name for method in _METHODS.values() for k in method.keys}
    clash = taken & {k.name for k in cls.keys}
    if cls.name in _METHODS or clash:
        raise ValueError(f"method '{cls.name}' registered twice or reuses keys {sorted(clash)}")
    _METHODS[cls.name] = cls
    return cls


def get(name: str) -> type[Distiller]:
    return _METHODS[name]


def names() -> tuple[str, ...]:
    return tuple(_METHODS)


def method_keys() -> list[tuple[str, Key]]:
    """Every method's own keys, with the method that declares each."""
    return [(name, k) for name, method in _METHODS.items() for k in method.keys]


def unused_keys(name: str) -> tuple[str, ...]:
    """Keys with no effect under method `name`: the other methods' own keys and the shared
    distillation keys it does not read."""
    method = _METHODS[name]
    own = {k.name for k in method.keys}
    others = [k.name for _, k in method_keys() if k.name not in own]
    return (*(k for k in DISTILLATION_KEYS if k not in method.uses), *others)


def structure(config: Config) -> tuple:
    """The values of the keys that shape what `config`'s method trains."""
    return tuple(getattr(config, k) for k in _METHODS[config.method].structure_keys)


def create(
    config: Config,
    student: nn.Module,
    teachers: Sequence[Teacher] = (),
    train_labels: Tensor | None = None,
) -> Distiller:
    """The distiller `config.method` names, around `student`; `train_labels`: the training set's
    labels, for methods that keep state per training image."""
    method = _METHODS[config.method]
    if method.uses_teacher and not teachers:
        raise ValueError(f"method '{config.method}' needs a teacher")
    return method(student, config, teachers, train_labels)
