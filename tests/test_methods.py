"""Every registered method, end to end on the CPU: trained through `python -m tune_kd.train`, in one
group with every other method, fused where it can be, and exported as a plain student.
(Each method's loss against the authors' code: its own test file; tests/golden/README.md.)"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import ROOT, sweep
from test_fused import SMALL, assert_same_metrics, fused_steps, train_members  # noqa: F401

from tune_kd import distillers, models, run
from tune_kd.config import UNUSED_BY_METHOD
from tune_kd.train import Run, main

# Keys a method needs to run on 96 images (CRD draws its negatives from the other classes').
SMALL_KEYS = {"crd": {"nce_k": 16}}


@pytest.fixture
def tiny(tiny, simkd_run) -> dict:
    """conftest's `tiny`, with the finished SimKD run that method `sequential` starts from (a key
    the other methods do not read: `method_config` leaves it out of theirs)."""
    return {**tiny, "sequential_from": str(simkd_run)}


def method_config(tiny: dict, method: str, keep: tuple[str, ...] = (), **keys) -> dict:
    """`tiny` for `method`, without the keys it does not read but those in `keep`."""
    config = {**tiny, "method": method, **SMALL_KEYS.get(method, {}), **keys}
    for key in UNUSED_BY_METHOD[method]:
        if key not in keep:
            config.pop(key, None)
    return config


def flags(config: dict) -> list[str]:
    return [
        part
        for key, value in config.items()
        for part in (f"--{key.replace('_', '-')}", json.dumps(value).strip('"'))
    ]


@pytest.mark.parametrize("method", distillers.names())
def test_every_method_trains_through_the_command_line_and_exports_a_plain_student(
    method, tiny, tmp_path, capsys
):
    out = tmp_path / "run"
    assert main([*flags(method_config(tiny, method, epochs=1)), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    assert all(r["train_loss"] > 0 and not r["diverged"] for r in rows)
    exported = torch.load(out / "student.pth", weights_only=True)["model"]
    models.create("resnet8", num_classes=10).load_state_dict(exported)  # strict: nothing else
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["members"][0]["distiller"]
    student = {k.removeprefix("student."): v for k, v in saved.items() if k.startswith("student.")}
    assert student.keys() == exported.keys()
    assert all(torch.equal(student[k], exported[k]) for k in exported)


def test_every_method_trains_in_one_group_sharing_one_teacher_pass(tiny):
    """The student baseline first: the group's teacher is the distilling students' all the same."""
    keep = ("teacher", "teacher_checkpoint")  # as a file's student baseline under its teacher
    configs = [method_config(tiny, m, keep, epochs=1) for m in ("student", *distillers.names())]
    run = Run(configs)
    assert run.teacher is not None
    for metrics in run.train_epoch():
        assert metrics is not None and not metrics["diverged"]


FUSABLE = [m for m in distillers.names() if distillers.get(m).fusable]


@pytest.mark.parametrize("method", FUSABLE)
def test_a_fused_student_of_each_method_reports_what_it_reports_alone(
    method,
    tiny,
    fused_steps,  # noqa: F811
):
    configs = [
        method_config(tiny, method, **SMALL, epochs=1),
        method_config(tiny, method, **SMALL, epochs=1, lr=0.02, weight_decay=1e-3),
    ]
    grouped = train_members(Run(configs))
    assert fused_steps and max(fused_steps) == 2
    for config, rows in zip(configs, grouped):
        assert_same_metrics(rows, train_members(Run([config]))[0])


APART = [m for m in distillers.names() if not distillers.get(m).fusable]


@pytest.mark.parametrize("method", APART)
def test_students_of_methods_that_cannot_fuse_train_one_after_another(
    method,
    tiny,
    fused_steps,  # noqa: F811
):
    configs = [method_config(tiny, method, **SMALL, epochs=1, lr=lr) for lr in (0.01, 0.05)]
    rows = train_members(Run(configs))
    assert fused_steps == []
    assert [[row["epoch"] for row in member] for member in rows] == [[1], [1]]


WITH_KEYS = [m for m in distillers.names() if distillers.get(m).keys]


@pytest.mark.parametrize("method", WITH_KEYS)
def test_a_method_s_own_keys_are_refused_under_another(method, tiny, capsys):
    first = distillers.get(method).keys[0]
    other = next(m for m in distillers.names() if first.name in UNUSED_BY_METHOD[m])
    value = json.dumps(first.default).strip('"')
    assert (
        main([*flags(method_config(tiny, other)), f"--{first.name.replace('_', '-')}", value]) == 2
    )
    error = capsys.readouterr().err
    assert f"'{first.name}': has no effect under method {other}" in error


def test_the_dry_run_says_what_crd_needs_and_which_methods_do_not_fuse(tmp_path, capsys):
    file = tmp_path / "methods.yaml"
    file.write_text(
        "teacher: resnet32x4\nteacher_train: {}\ngrid: {method: [crd, kd]}\n"
        "group_students: true\nfuse_students: true\n"
    )
    assert run.main(["--dry-run", "--space", str(file), "--storage", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    gathered = 2 * 64 * 16385 * 128 * 4  # both sides' rows, fp32, kept for backward
    banks = 2 * 50_000 * 128 * 4 + 64 * 50_000 * 4  # the banks and the sampler's keys
    assert f"method crd: each trial needs about {(gathered + banks) / 2**30:.1f} GiB" in out
    assert "method kd:" not in out
    assert "not fused, trained one after another in their groups: crd\n" in out


@pytest.mark.e2e
def test_every_method_runs_in_one_grouped_sweep(tmp_path):
    """`methods_quick.yaml` through `python -m tune_kd.run`, shrunk: every method planned, trained
    and compared per pair in the results."""
    shrink = {
        "synthetic_train_size": 128,
        "synthetic_test_size": 64,
        "batch_size": 32,
        "epochs": 2,
        "lr_decay_epochs": "[1]",
        "nce_k": 32,
        "teacher_train.epochs": 1,
        "teacher_train.lr_decay_epochs": "[1]",
    }
    sets = [part for k, v in shrink.items() for part in ("--set", f"{k}={v}")]
    space = ROOT / "search_spaces" / "methods_quick.yaml"
    done = sweep("--space", str(space), *sets, "--storage", str(tmp_path), "--name", "m")
    assert done.returncode == 0, done.stderr[-3000:]
    names = distillers.names()
    assert "training 1 stage-1 SimKD run(s) first" in done.stdout  # sequential's, after the teacher
    assert f"{len(names)} planned: {len(names)} completed" in done.stdout
    trials = pd.read_parquet(tmp_path / "m" / "results" / "trials.parquet")
    assert sorted(trials["method"]) == sorted(names)
    assert set(trials["status"]) == {"completed"}
    assert (tmp_path / "m" / "results" / "methods.md").exists()
