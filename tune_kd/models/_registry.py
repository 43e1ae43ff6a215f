"""Name -> constructor registry for the CIFAR model zoo, and checkpoint loading.

Architecture names are the ones the distillation literature uses (RepDistiller / CRD and
SimKD), so that teacher checkpoints shared in folders such as
``resnet32x4_vanilla/ckpt_epoch_240.pth`` load by name with strict key matching.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = [
    "arch_from_path",
    "archs_matching",
    "create",
    "family",
    "load_checkpoint",
    "names",
    "num_classes",
    "register",
]

Constructor = Callable[..., nn.Module]
_C = TypeVar("_C", bound=Constructor)

_constructors: dict[str, Constructor] = {}
_families: dict[str, str] = {}

# BatchNorm fills this buffer in when a checkpoint predates it, so it never decides a match.
_OPTIONAL_KEY_SUFFIX = "num_batches_tracked"
_SHOWN_KEYS = 5


def register(family: str, name: str | None = None) -> Callable[[_C], _C]:
    """Decorator recording a constructor ``fn(num_classes=...)`` under ``name``
    (default: the function's name) in ``family`` (the module that defines it)."""

    def decorator(fn: _C) -> _C:
        key = name or fn.__name__
        if key in _constructors:
            raise ValueError(f"model {key!r} is already registered")
        _constructors[key] = fn
        _families[key] = family
        return fn

    return decorator


def _unknown(name: str) -> ValueError:
    close = difflib.get_close_matches(name, _constructors, n=4, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see tune_kd.models.names()"
    return ValueError(f"unknown model {name!r}; {hint}")


def _check_known(name: str) -> None:
    if name not in _constructors:
        raise _unknown(name)


def create(name: str, num_classes: int = 100) -> nn.Module:
    """Build the registered architecture ``name`` with a ``num_classes``-way classifier."""
    _check_known(name)
    return _constructors[name](num_classes=num_classes)


def num_classes(model: nn.Module) -> int:
    """The number of classes a model's classifier predicts."""
    linears = [m for m in model.get_classifier().modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features


def names(pattern: str | None = None) -> list[str]:
    """Registered names in registration order, optionally filtered by a case-sensitive
    fnmatch wildcard such as ``'resnet*'``."""
    if pattern is None:
        return list(_constructors)
    return [n for n in _constructors if fnmatch.fnmatchcase(n, pattern)]


def family(name: str) -> str:
    """The family (defining module) of a registered name: resnet, wrn, vgg, mobilenetv2 or
    shufflenet."""
    _check_known(name)
    return _families[name]


def _arch_prefix(label: str) -> str | None:
    """Longest registered name that ``label`` starts with, followed by ``_`` or its end."""
    if label.startswith("S:"):  # SimKD / RepDistiller student runs: S:<student>_T:<teacher>_...
        label = label[2:]
    fits = [n for n in _constructors if label == n or label.startswith(n + "_")]
    return max(fits, key=len) if fits else None


def arch_from_path(path: str | os.PathLike[str]) -> str | None:
    """Architecture named by a checkpoint path, following the field's folder convention
    (``resnet32x4_vanilla/ckpt_epoch_240.pth`` -> ``resnet32x4``), else by its file stem
    (``resnet32x4_best.pth``); None when neither names a registered architecture."""
    p = Path(path)
    return _arch_prefix(p.parent.name) or _arch_prefix(p.stem)


@functools.cache
def _reference_shapes(name: str) -> tuple[str, dict[str, tuple[int, ...]]]:
    """The classifier weight's key and every state-dict shape of ``name``, built once on
    the meta device with num_classes=1 (num_classes only sets the classifier's first
    dimension)."""
    with torch.device("meta"):
        model = create(name, num_classes=1)
    classifier = model.get_classifier()
    prefix = next(n for n, m in model.named_modules() if m is classifier)
    linear = [n for n, m in classifier.named_modules() if isinstance(m, nn.Linear)][-1]
    weight_key = ".".join(part for part in (prefix, linear, "weight") if part)
    return weight_key, {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _classifier_weight_key(name: str) -> str:
    """State-dict key of the classifier's weight, whose first dimension is num_classes."""
    return _reference_shapes(name)[0]


def _shapes(name: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    weight_key, shapes = _reference_shapes(name)
    bias_key = weight_key.removesuffix("weight") + "bias"
    return {
        **shapes,
        weight_key: (num_classes, *shapes[weight_key][1:]),
        bias_key: (num_classes,),
    }


def _num_classes(name: str, state_dict: Mapping[str, torch.Tensor]) -> int | None:
    weight = state_dict.get(_classifier_weight_key(name))
    return weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _without_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without the ``module.`` prefix that (Distributed)DataParallel adds."""
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def _differences(
    expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """Missing keys, unexpected keys and shape mismatches of ``state_dict`` against
    ``expected`` (key -> shape)."""
    missing = [k for k in expected if k not in state_dict and not k.endswith(_OPTIONAL_KEY_SUFFIX)]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)}, model {expected[k]}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    return missing, unexpected, mismatched


def archs_matching(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Registered architectures whose state-dict keys and shapes equal ``state_dict``'s
    (num_classes taken from its classifier weight; a ``module.`` prefix is ignored and a
    missing ``num_batches_tracked`` tolerated). Candidates are built on the meta device,
    so nothing is allocated."""
    state_dict = _without_prefix(state_dict)
    matches = []
    for name in _constructors:
        num_classes = _num_classes(name, state_dict)
        if num_classes is None:
            continue
        if not any(_differences(_shapes(name, num_classes), state_dict)):
            matches.append(name)
    return matches


def _shorten(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN_KEYS])
    more = len(items) - _SHOWN_KEYS
    return f"{shown} (+{more} more)" if more > 0 else shown


def _read(path: Path, map_location: Any) -> object:
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist or is not a file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused:
            raise ValueError(
                f"{path} is not a plain checkpoint: it holds Python objects "
                f"({refused.group(1)}) that torch.load(weights_only=True) refuses to "
                "unpickle, and we never execute a checkpoint; if you trust the file, re-save "
                "just its state dict"
            ) from None
        raise ValueError(f"{path} is not a PyTorch checkpoint (cannot be unpickled)") from None
    except Exception as err:
        raise ValueError(
            f"{path} is not a PyTorch checkpoint ({type(err).__name__}: {err})"
        ) from None


def _state_dict_of(ckpt: object, path: Path) -> dict[str, torch.Tensor]:
    """The model's state dict from a bare state dict or a ``{'model': state_dict, ...}``
    dict, without DataParallel's ``module.`` prefix."""
    if isinstance(ckpt, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(ckpt.get(key), Mapping):
                ckpt = ckpt[key]
                break
    if isinstance(ckpt, Mapping):
        is_state_dict = bool(ckpt) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt.items()
        )
        if is_state_dict:
            return _without_prefix(ckpt)
        found = f"a dict with keys {_shorten([str(k) for k in ckpt])}"
    else:
        found = f"a {type(ckpt).__name__}"
    raise ValueError(
        f"{path} is not a model checkpoint: expected a state dict or a dict with a "
        f"'model' state dict, found {found}"
    )


def _infer_name(path: Path, state_dict: Mapping[str, torch.Tensor]) -> str:
    name = arch_from_path(path)
    if name is not None:
        return name
    matches = archs_matching(state_dict)
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(
            f"cannot tell the architecture of {path}: its keys fit {', '.join(matches)}; pass name="
        )
    raise ValueError(
        f"cannot infer the architecture of {path}: neither its folder nor its file name "
        "starts with a registered name (e.g. resnet32x4_vanilla/) and its keys match no "
        "registered architecture; pass name="
    )


def _mismatch_message(
    path: Path, name: str, state_dict: Mapping[str, torch.Tensor], problems: list[str]
) -> str:
    looks_like = archs_matching(state_dict)
    verdict = (
        f"the keys look like {', '.join(looks_like)}"
        if looks_like
        else "the keys match no registered architecture"
    )
    return f"{path} does not fit {name}: {'; '.join(problems)}; {verdict}"


def load_checkpoint(
    path: str | os.PathLike[str], name: str | None = None, map_location: Any = "cpu"
) -> nn.Module:
    """Load a checkpoint (a state dict, or a dict with a ``model`` state dict) into a
    freshly built model, with strict key matching, and return it in eval mode.

    The architecture is ``name``, else inferred from the path (:func:`arch_from_path`),
    else from the keys (:func:`archs_matching`); num_classes comes from the classifier
    weight. The file is read with ``weights_only=True``: a checkpoint is a pickle and is
    never executed. When ``map_location`` names a device, the model is moved there.
    Every failure raises ``ValueError``.
    """
    path = Path(path)
    state_dict = _state_dict_of(_read(path, map_location), path)
    if name is None:
        name = _infer_name(path, state_dict)
    _check_known(name)
    num_classes = _num_classes(name, state_dict) or 100
    missing, unexpected, mismatched = _differences(_shapes(name, num_classes), state_dict)
    problems = [
        f"{label} {_shorten(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    if problems:
        raise ValueError(_mismatch_message(path, name, state_dict, problems))
    model = create(name, num_classes=num_classes)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not load into {name}: {err}") from None
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval()
