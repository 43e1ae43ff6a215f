"""tune_kd.config: every check of a key and its message, the rules across keys, coercion to each
key's type, the automatic choices of `resolve`, the did-you-mean suggestions and the key table."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from tune_kd import config as configs
from tune_kd import distillers, models
from tune_kd.config import KEYS, Config, ConfigError, check_key, resolve, suggest

# Enough to pass the rules across keys: a teacher for the default method, simkd.
VALID = {"teacher": "resnet8"}


def refused(values: dict) -> ConfigError:
    with pytest.raises(ConfigError) as error:
        Config.from_dict({**VALID, **values})
    return error.value


# ----------------------------------------------------------------------------- one key


@pytest.mark.parametrize(
    ("key", "value", "detail"),
    [
        # a value is required where None is not allowed
        ("dataset", None, "a value is required"),
        ("epochs", None, "a value is required"),
        # strings
        ("dataset", 3, "expected a string, got 3"),
        ("device", ["cpu"], "expected a string, got ['cpu']"),
        # booleans: only true and false, not 1 or "yes"
        ("download", "yes", "expected true or false, got 'yes'"),
        ("nesterov", 1, "expected true or false, got 1"),
        ("fuse_students", "false", "expected true or false, got 'false'"),
        # integers: not floats, not booleans, not strings
        ("epochs", 2.5, "expected an integer, got 2.5"),
        ("epochs", True, "expected an integer, got True"),
        ("batch_size", "64", "expected an integer, got '64'"),
        # floats: numbers and numeric strings, finite, not booleans
        ("lr", "fast", "expected a number, got 'fast'"),
        ("lr", True, "expected a finite number, got True"),
        ("weight_decay", math.nan, "expected a finite number, got nan"),
        ("temperature", "inf", "expected a finite number, got inf"),
        ("momentum", [0.9], "expected a finite number, got [0.9]"),
        # choices
        ("dataset", "imagenet", "expected one of cifar100, cifar10, synthetic, got 'imagenet'"),
        ("method", "hinton", f"expected one of {', '.join(distillers.names())}, got 'hinton'"),
        ("loss", "huber", "expected one of l2, cosine, kl, got 'huber'"),
        ("intermediate_loss", "kl", "expected one of l2, cosine, got 'kl'"),
        ("projector", "every", "expected one of single, multi, all, got 'every'"),
        (
            "projector_design",
            "3x3",
            "expected one of 1x1, 1x1-1x1, 1x1-dw3x3-1x1, 1x1-3x3-1x1, got '3x3'",
        ),
        ("factor", 3, "expected one of 1, 2, 4, 8, got 3"),
        ("precision", "fp16", "expected one of auto, bf16, fp32, got 'fp16'"),
        ("compile", "on", "expected one of off, default, reduce-overhead, max-autotune, got 'on'"),
        # lower bounds, closed and open
        ("val_size", -1, "expected a value >= 0, got -1"),
        ("synthetic_classes", 1, "expected a value >= 2, got 1"),
        ("synthetic_train_size", 0, "expected a value >= 1, got 0"),
        ("epochs", 0, "expected a value >= 1, got 0"),
        ("seed", -1, "expected a value >= 0, got -1"),
        ("weight_decay", -1e-4, "expected a value >= 0, got -0.0001"),
        ("ce_weight", -1, "expected a value >= 0, got -1.0"),
        ("lr", 0, "expected a value > 0, got 0.0"),
        ("temperature", 0.0, "expected a value > 0, got 0.0"),
        ("lr_decay_rate", -0.1, "expected a value > 0, got -0.1"),
        # upper bound
        ("momentum", 1.5, "expected a value <= 1, got 1.5"),
        # lists: a list or tuple, each item checked
        ("lr_decay_epochs", 150, "expected a list, got 150"),
        ("lr_decay_epochs", "150", "expected a list, got '150'"),
        ("lr_decay_epochs", [150, 0], "expected a value >= 1, got 0"),
        ("lr_decay_epochs", [1.5], "expected an integer, got 1.5"),
        ("projector_weights", [1, -1], "expected a value >= 0, got -1.0"),
    ],
)
def test_a_bad_value_names_its_key_and_what_was_expected(key, value, detail):
    error = refused({key: value})
    assert (error.key, error.detail) == (key, detail)
    assert str(error) == f"key '{key}': {detail}"


@pytest.mark.parametrize("key", ["teacher", "student"])
def test_an_unknown_model_is_refused_with_close_names(key):
    error = refused({key: "resnet8x5"})
    assert error.key == key
    assert error.detail.startswith("unknown model 'resnet8x5'; did you mean ")
    assert "resnet8x4" in error.detail.split("did you mean ")[1]


def test_an_unknown_key_suggests_close_keys_or_nothing():
    closest_first = "unknown key; did you mean weight_decay, "
    assert refused({"weight_decy": 0.1}).detail.startswith(closest_first)
    error = refused({"zzzz": 1})
    assert (error.key, error.detail) == ("zzzz", "unknown key")


def test_check_key_names_the_place_given_instead_of_the_key():
    with pytest.raises(ConfigError) as error:
        check_key("lr", -1, where="grid.lr[2]")
    assert str(error.value) == "key 'grid.lr[2]': expected a value > 0, got -1.0"
    with pytest.raises(ConfigError) as error:
        check_key("lrr", 0.1, where="grid.lrr")
    assert (error.value.key, error.value.detail) == ("grid.lrr", "unknown key; did you mean lr?")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("momentum", 1),  # the upper bound is closed
        ("momentum", 0),
        ("weight_decay", 0),  # a closed lower bound
        ("val_size", 0),
        ("ce_weight", 0),
        ("lr", 1e-9),  # just above an open one
        ("factor", 8),
        ("device", "cuda:3"),
        ("teacher_checkpoint", None),  # optional keys take None
        ("intermediate_loss", None),
        ("lr_decay_epochs", []),
    ],
)
def test_boundary_values_are_accepted(key, value):
    assert getattr(Config.from_dict({**VALID, key: value}), key) == value


# ----------------------------------------------------------------------------- coercion


def test_values_come_back_in_their_keys_type():
    config = Config.from_dict(
        {
            **VALID,
            "lr": 1,  # an int for a float key
            "weight_decay": "5e-4",  # what YAML 1.1 reads from `5e-4`
            "temperature": "2",
            "lr_decay_epochs": (100, 200),  # a tuple for a list key
            "projector_weights": [1, 2],
            "projector": "multi",
        }
    )
    assert config.lr == 1.0 and type(config.lr) is float
    assert config.weight_decay == 5e-4 and type(config.weight_decay) is float
    assert config.temperature == 2.0 and type(config.temperature) is float
    assert config.lr_decay_epochs == [100, 200] and type(config.lr_decay_epochs) is list
    assert config.projector_weights == [1.0, 2.0]
    assert all(type(w) is float for w in config.projector_weights)


def test_a_dict_round_trips_and_replace_validates():
    config = Config.from_dict({**VALID, "lr": 0.1, "seed": 3})
    assert Config.from_dict(config.to_dict()) == config
    changed = config.replace(seed=4)
    assert (changed.seed, config.seed) == (4, 3)
    assert changed.to_dict() == {**config.to_dict(), "seed": 4}
    with pytest.raises(ConfigError) as error:
        config.replace(lr=-1)
    assert error.value.key == "lr"
    with pytest.raises(ConfigError) as error:
        config.replace(method="kd", teacher=None)
    assert error.value.key == "teacher"


def test_defaults_are_the_papers_recipe_and_each_list_is_its_own():
    first, second = Config(), Config()
    assert first.lr_decay_epochs == [150, 180, 210]
    assert first.lr_decay_epochs is not second.lr_decay_epochs


def test_num_classes_is_known_without_loading_the_data():
    assert Config(dataset="cifar100").num_classes == 100
    assert Config(dataset="cifar10").num_classes == 10
    assert Config(dataset="synthetic", synthetic_classes=7).num_classes == 7


def test_data_key_changes_with_the_data_only():
    base = Config(dataset="synthetic", teacher="resnet8")
    same = [base.replace(lr=0.3), base.replace(seed=5), base.replace(student="resnet14")]
    assert {c.data_key for c in same} == {base.data_key}
    other = [
        base.replace(synthetic_train_size=10),
        base.replace(val_size=10),
        base.replace(synthetic_classes=3),
        base.replace(dataset="cifar10"),
    ]
    assert len({c.data_key for c in [base, *other]}) == 5


# ----------------------------------------------------------------------------- across keys


@pytest.mark.parametrize(
    ("values", "key", "detail"),
    [
        ({"teacher": None}, "teacher", "method 'simkd' needs a teacher architecture"),
        ({"method": "kd", "teacher": None}, "teacher", "method 'kd' needs a teacher architecture"),
        (
            {"method": "student", "teacher_correct_only": True},
            "teacher_correct_only",
            "needs method kd, simkd, reuse",
        ),
        ({"projector_weights": [1, 1]}, "projector_weights", "projector 'single' takes 1"),
        (
            {"projector": "multi", "projector_weights": [1]},
            "projector_weights",
            "projector 'multi' takes 2",
        ),
        ({"device": "gpu"}, "device", "expected auto, cpu, cuda or cuda:N, got 'gpu'"),
        ({"device": "tpu:0"}, "device", "expected auto, cpu, cuda or cuda:N, got 'tpu:0'"),
        ({"lr_decay_epochs": [180, 150]}, "lr_decay_epochs", "must be increasing, got [180, 150]"),
        ({"lr_decay_epochs": [150, 150]}, "lr_decay_epochs", "must be increasing, got [150, 150]"),
        (
            {"epochs": 10, "lr_decay_epochs": [5, 12]},
            "lr_decay_epochs",
            "12 is beyond the last epoch (10): give decay epochs within the run",
        ),
        (
            {"epochs": 100},  # the default decay epochs are past a shorter run
            "lr_decay_epochs",
            "210 is beyond the last epoch (100): give decay epochs within the run",
        ),
    ],
)
def test_rules_across_keys(values, key, detail):
    error = refused(values)
    assert (error.key, error.detail) == (key, detail)


def test_the_rules_across_keys_hold_for_configs_built_directly():
    with pytest.raises(ConfigError, match="needs a teacher"):
        Config(method="kd").check_consistency()
    Config(method="student").check_consistency()  # no teacher needed


@pytest.mark.parametrize(
    "values",
    [
        {"method": "student", "teacher": None},
        {"projector": "all", "projector_weights": [1, 2, 3, 4]},  # all: any number of them
        {"projector": "multi", "projector_weights": [0.5, 1]},
        {"epochs": 10, "lr_decay_epochs": [10]},  # the last epoch itself
        {"device": "cpu"},
    ],
)
def test_consistent_combinations_are_accepted(values):
    config = Config.from_dict({**VALID, **values})
    assert {k: getattr(config, k) for k in values} == values


# ----------------------------------------------------------------------------- resolve


@pytest.fixture
def cuda(monkeypatch):
    """`resolve` as it decides on a machine with (True) or without (False) a CUDA device."""

    def set_cuda(available: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)

    return set_cuda


def test_resolve_fills_lr_and_ce_weight_but_keeps_given_values():
    simkd = resolve(Config(teacher="resnet8", device="cpu"))
    assert (simkd.lr, simkd.ce_weight) == (0.05, 0.0)
    kd = resolve(Config(method="kd", teacher="resnet8", student="ShuffleV2", device="cpu"))
    assert (kd.lr, kd.ce_weight) == (0.01, 1.0)
    assert resolve(Config(method="student", device="cpu")).ce_weight == 1.0
    given = resolve(Config(teacher="resnet8", student="MobileNetV2", lr=0.3, ce_weight=0.5))
    assert (given.lr, given.ce_weight) == (0.3, 0.5)


@pytest.mark.parametrize(
    ("available", "device", "precision", "expected"),
    [
        (False, "auto", "auto", ("cpu", "fp32")),
        (True, "auto", "auto", ("cuda", "bf16")),
        (True, "cpu", "auto", ("cpu", "fp32")),
        (False, "cpu", "bf16", ("cpu", "fp32")),  # bf16 is for CUDA alone
        (True, "cuda:1", "bf16", ("cuda:1", "bf16")),
        (True, "cuda", "fp32", ("cuda", "fp32")),
    ],
)
def test_resolve_chooses_device_and_precision(cuda, available, device, precision, expected):
    cuda(available)
    config = resolve(Config(teacher="resnet8", device=device, precision=precision))
    assert (config.device, config.precision) == expected


def test_on_a_cpu_resolve_turns_the_cuda_features_off(cuda):
    cuda(True)  # a CPU run on a machine that has a GPU
    requested = Config(
        teacher="resnet8", device="cpu", compile="default", channels_last=True, cuda_graphs=True
    )
    config = resolve(requested)
    assert (config.compile, config.channels_last, config.cuda_graphs) == ("off", False, False)
    assert config.fuse_students is False  # one after another unless asked: measured faster
    assert resolve(dataclasses.replace(requested, fuse_students=True)).fuse_students is True


@pytest.mark.parametrize(
    ("compile", "fuse", "expected"),
    [
        # (compile, fuse_students) -> (cuda_graphs, fuse_students, channels_last)
        ("off", False, (True, False, True)),  # the default: measured faster than fused
        ("off", True, (True, True, True)),
        ("default", True, (True, False, True)),  # compiled students run one after another
        ("reduce-overhead", False, (False, False, True)),  # torch.compile captures its own graphs
        ("max-autotune", False, (True, False, True)),
    ],
)
def test_on_cuda_resolve_settles_graphs_and_fusion(cuda, compile, fuse, expected):
    cuda(True)
    config = resolve(Config(teacher="resnet8", device="cuda", compile=compile, fuse_students=fuse))
    assert (config.cuda_graphs, config.fuse_students, config.channels_last) == expected
    assert config.compile == compile


@pytest.mark.parametrize("available", [False, True])
def test_resolve_is_idempotent_and_leaves_its_input_alone(cuda, available):
    cuda(available)
    config = Config(teacher="resnet8", student="MobileNetV2", compile="reduce-overhead")
    resolved = resolve(config)
    assert resolve(resolved) == resolved
    assert (config.lr, config.device, config.ce_weight) == (None, "auto", None)


# ----------------------------------------------------------------------------- suggest, describe


def test_suggest_names_up_to_three_close_candidates():
    assert suggest("weight_decay", ["weight_decay", "seed"]) == "; did you mean weight_decay?"
    assert suggest("weight_decy", KEYS).startswith("; did you mean weight_decay, ")
    assert suggest("qqqq", KEYS) == ""
    assert suggest("lr", []) == ""
    many = ["seed1", "seed2", "seed3", "seed4", "other"]
    names = re.fullmatch(r"; did you mean (.*)\?", suggest("seed", many))[1].split(", ")
    assert len(names) == 3 and set(names) < set(many[:4])
    assert suggest("resnet8x5", models.names()).startswith("; did you mean resnet8x4")


def test_describe_has_one_row_per_key_with_its_default_and_help():
    rows = configs.describe().splitlines()
    assert [row.split()[0] for row in rows] == list(KEYS)
    defaults = Config()
    for row, f in zip(rows, dataclasses.fields(Config)):
        assert str(getattr(defaults, f.name)) in row and row.endswith(f.metadata["help"])
    assert re.fullmatch(r"\s+epochs\s+240\s+training epochs", rows[KEYS.index("epochs")])
    decays = rows[KEYS.index("lr_decay_epochs")]
    assert re.fullmatch(r"\s+lr_decay_epochs\s+\[150, 180, 210\]\s+epochs after .*", decays)


def test_every_key_is_described_in_the_training_commands_help(capsys):
    from tune_kd import train

    with pytest.raises(SystemExit) as done:
        train.main(["--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    assert all(row in shown for row in configs.describe().splitlines())
