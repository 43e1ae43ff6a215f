"""Bad input to the three command lines: exit status 2, one `error:` line naming the file and the
key (or the flag), no traceback, and nothing written.

The table runs each command's `main` in this process; a few cases run as real subprocesses too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from tune_kd import analysis, models, run, space, storage, train
from tune_kd.space import SpaceError

ROOT = Path(__file__).parents[1]
MAINS = {"run": run.main, "train": train.main, "analysis": analysis.main}

# A valid one-trial file: each case breaks one thing in it.
GOOD = {
    "name": "bad",
    "dataset": "synthetic",
    "synthetic_train_size": 64,
    "synthetic_test_size": 32,
    "method": "student",
    "student": "resnet8",
    "epochs": 2,
    "lr_decay_epochs": [1],
    "batch_size": 32,
    "device": "cpu",
}
DISTIL = {"method": "simkd", "teacher": "resnet14"}
# Executes code when unpickled or constructed; `MARKER` is replaced by a path.
PYTHON_TAG = "!!python/object/apply:os.system ['touch MARKER']"


def alias_bomb(levels: int) -> str:
    """A YAML list of a few lines that stands for 10**levels values once its aliases expand."""
    lists = ["&l0 [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]"]
    lists += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "[" + ",\n  ".join(lists) + "]"


def wide_grid() -> str:
    """Ten axes of ten values each: 10**10 trials from 20 values."""
    floats = ("momentum", "weight_decay", "temperature", "kd_weight", "lr")
    ints = ("val_size", "synthetic_classes", "synthetic_test_size")
    lines = ["grid:", "  seed: &i [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"]
    lines.append("  ce_weight: &f [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]")
    lines += [f"  {axis}: *f" for axis in floats] + [f"  {axis}: *i" for axis in ints]
    return "\n".join(lines) + "\n"


@dataclass
class Files:
    """A case's folder: the input files it writes, and where output would go."""

    tmp: Path
    pending_experiment: Callable[..., Path]  # writes a valid experiment folder

    @property
    def storage(self) -> Path:
        return self.tmp / "results"

    @property
    def out(self) -> Path:
        return self.tmp / "run"

    @property
    def marker(self) -> Path:
        """Appears only if some input managed to execute code."""
        return self.tmp / "executed"

    @property
    def space_file(self) -> str:
        return str(self.tmp / "space.yaml")

    def write(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content.replace("MARKER", str(self.marker)))
        return str(path)

    @property
    def python_tag(self) -> str:
        return PYTHON_TAG.replace("MARKER", str(self.marker))

    def run_space(self, path: str, *extra: str) -> list[str]:
        """`run` of the space file at `path` (T stands for this folder)."""
        return ["--space", path.format(tmp=self.tmp), "--storage", str(self.storage), *extra]

    def run_text(self, text: str | bytes, *extra: str) -> list[str]:
        """`run` of a space file with this content."""
        return self.run_space(self.write("space.yaml", text), *extra)

    def run(self, *extra: str, **keys) -> list[str]:
        """`run` of GOOD with `keys` changed."""
        return self.run_text(yaml.safe_dump({**GOOD, **keys}), *extra)

    def distil_run(self, checkpoint: str | Path) -> list[str]:
        return self.run(**DISTIL, teacher_checkpoints={"resnet14": str(checkpoint)})

    def train(self, *extra: str) -> list[str]:
        """`train` of GOOD as a --config file, then `extra`."""
        values = {k: v for k, v in GOOD.items() if k != "name"}
        return [
            "--config",
            self.write("train.yaml", yaml.safe_dump(values)),
            "--out",
            str(self.out),
            *extra,
        ]

    def distil_train(self, checkpoint: str | Path) -> list[str]:
        return self.train(
            "--method=simkd", "--teacher=resnet14", f"--teacher-checkpoint={checkpoint}"
        )

    def text_checkpoint(self) -> str:
        return self.write("resnet14_vanilla/ckpt_epoch_240.pth", "not a checkpoint\n")

    def other_arch(self) -> Path:
        """resnet8 weights."""
        path = self.tmp / "resnet8.pth"
        torch.save({"model": models.create("resnet8", 10).state_dict()}, path)
        return path

    def other_classes(self) -> Path:
        """resnet14 weights for 100 classes."""
        path = self.tmp / "resnet14-100.pth"
        torch.save({"model": models.create("resnet14", 100).state_dict()}, path)
        return path

    def stored_plan(self, name: str, plan: str) -> str:
        """An experiment `name` in the storage, with this plan file."""
        self.write(f"results/{name}/tune_kd_plan.json", plan)
        return name

    def experiment(self, plan: str | None) -> str:
        """A folder that claims to be an experiment, with this plan file (None: without)."""
        folder = self.tmp / "experiment"
        folder.mkdir()
        if plan is not None:
            (folder / "tune_kd_plan.json").write_text(plan)
        return str(folder)


# Each case: the command, its arguments from the case's Files, and texts its one line holds, in
# which S stands for the space file and T for the case's folder.
S, T = "{space}", "{tmp}"
CASES: dict[str, tuple] = {
    # --- the space file as a file
    "malformed-yaml": (
        "run",
        lambda f: f.run_text("name: [unclosed\n"),
        S,
        "not valid YAML",
        "line 2",
    ),
    "not-a-mapping": ("run", lambda f: f.run_text("- a list\n"), S, "mapping of keys"),
    "python-tag": (
        "run",
        lambda f: f.run_text(f"name: {PYTHON_TAG}\n"),
        S,
        "python/object/apply:os.system",
    ),
    "binary-garbage": ("run", lambda f: f.run_text(bytes(range(256)) * 4), S, "not a text file"),
    "control-characters": ("run", lambda f: f.run_text("name: a\x00b\n"), S, "not valid YAML"),
    "nested-too-deep": (
        "run",
        lambda f: f.run_text("grid: " + "[" * 2000 + "]" * 2000),
        S,
        "nested too deeply",
    ),
    "alias-bomb": (
        "run",
        lambda f: f.run_text(f"grid: {{seed: {alias_bomb(9)}}}"),
        S,
        "'grid'",
        "aliases",
    ),
    "alias-cycle": ("run", lambda f: f.run_text("grid: {seed: &a [*a]}\n"), S, "'grid'", "aliases"),
    "grid-of-a-billion": (
        "run",
        lambda f: f.run_text(wide_grid()),
        S,
        "'grid'",
        "10000000000 trials",
    ),
    "missing-space-file": (
        "run",
        lambda f: f.run_space(T + "/nowhere.yaml"),
        "nowhere.yaml",
        "cannot read",
    ),
    "space-file-is-a-folder": ("run", lambda f: f.run_space(T), T, "cannot read"),
    # --- keys
    "unknown-key": ("run", lambda f: f.run(lernrate=0.1), S, "'lernrate'", "unknown key"),
    "unknown-key-in-grid": ("run", lambda f: f.run(grid={"lernrate": [0.1]}), S, "'grid.lernrate'"),
    "unknown-key-in-bundle": (
        "run",
        lambda f: f.run(grid={"pair": [{"studnt": "resnet8"}]}),
        S,
        "'grid.pair.studnt'",
        "did you mean student",
    ),
    "axis-not-a-list": ("run", lambda f: f.run(grid={"lr": 0.1}), S, "'grid.lr'", "list"),
    "empty-axis": ("run", lambda f: f.run(grid={"lr": []}), S, "'grid.lr'", "non-empty"),
    "grid-not-a-mapping": ("run", lambda f: f.run(grid=["lr"]), S, "'grid'"),
    "wrong-type": ("run", lambda f: f.run(epochs="ten"), S, "'epochs'", "integer"),
    "zero-lr": ("run", lambda f: f.run(lr=0), S, "'lr'", "> 0"),
    "negative-lr-in-grid": ("run", lambda f: f.run(grid={"lr": [0.1, -1]}), S, "'grid.lr'", "> 0"),
    "zero-epochs": ("run", lambda f: f.run(epochs=0), S, "'epochs'", ">= 1"),
    "zero-batch-size": ("run", lambda f: f.run(batch_size=0), S, "'batch_size'", ">= 1"),
    "decay-out-of-order": (
        "run",
        lambda f: f.run(epochs=4, lr_decay_epochs=[3, 1]),
        S,
        "'lr_decay_epochs'",
        "increasing",
    ),
    "decay-repeated": (
        "run",
        lambda f: f.run(epochs=4, lr_decay_epochs=[2, 2]),
        S,
        "'lr_decay_epochs'",
        "increasing",
    ),
    "decay-beyond-last-epoch": (
        "run",
        lambda f: f.run(lr_decay_epochs=[1, 5]),
        S,
        "'lr_decay_epochs'",
        "beyond the last epoch (2)",
    ),
    "unknown-dataset": ("run", lambda f: f.run(dataset="imagenet"), S, "'dataset'", "cifar100"),
    "unknown-model": (
        "run",
        lambda f: f.run(student="resnet8x5"),
        S,
        "'student'",
        "did you mean resnet8x4",
    ),
    "unknown-loss": ("run", lambda f: f.run(loss="huber"), S, "'loss'", "l2, cosine, kl"),
    "unknown-projector": ("run", lambda f: f.run(projector="every"), S, "'projector'", "single"),
    "factor-not-offered": ("run", lambda f: f.run(factor=3), S, "'factor'", "1, 2, 4, 8"),
    "gpu-fraction-above-1": ("run", lambda f: f.run(resources={"gpu": 1.5}), S, "'resources.gpu'"),
    "negative-cpus": ("run", lambda f: f.run(resources={"cpu": -1}), S, "'resources.cpu'", "> 0"),
    "unknown-resource": (
        "run",
        lambda f: f.run(resources={"gpus": 1}),
        S,
        "'resources.gpus'",
        "unknown key",
    ),
    "unknown-scheduler": (
        "run",
        lambda f: f.run(scheduler={"name": "hyperband"}),
        S,
        "'scheduler.name'",
        "fifo, asha",
    ),
    "loguniform-from-0": (
        "run",
        lambda f: f.run(search={"algorithm": "optuna", "space": {"lr": {"loguniform": [0, 1]}}}),
        S,
        "'search.space.lr'",
        "> 0",
    ),
    "groups-under-asha": (
        "run",
        lambda f: f.run(group_students=True, scheduler="asha"),
        S,
        "'group_students'",
        "scheduler fifo",
    ),
    "too-many-samples": (
        "run",
        lambda f: f.run(
            search={
                "algorithm": "optuna",
                "samples": 10**9,
                "space": {"lr": {"uniform": [0.01, 0.1]}},
            }
        ),
        S,
        "'search.samples'",
    ),
    "bad-space-name": ("run", lambda f: f.run(name="../outside"), S, "'name'", "not a folder name"),
    # --- flags of run
    "set-unknown-key": ("run", lambda f: f.run("--set", "lernrate=0.1"), S, "'lernrate'"),
    "set-bad-value": ("run", lambda f: f.run("--set", "lr=fast"), S, "'lr'", "number"),
    "set-not-yaml": ("run", lambda f: f.run("--set", "lr=[0.1"), "'lr'", "not a YAML value"),
    "set-python-tag": (
        "run",
        lambda f: f.run("--set", f"lr={f.python_tag}"),
        "'lr'",
        "not a YAML value",
    ),
    "set-alias-bomb": (
        "run",
        lambda f: f.run("--set", "seed=" + alias_bomb(6).replace("\n", "")),
        "--set",
        "'seed'",
        "aliases",
    ),
    "set-without-value": ("run", lambda f: f.run("--set", "lr"), "'lr'", "key=value"),
    "max-concurrent-0": (
        "run",
        lambda f: f.run("--max-concurrent", "0"),
        "--max-concurrent",
        "'0'",
    ),
    "max-concurrent-text": (
        "run",
        lambda f: f.run("--max-concurrent", "many"),
        "--max-concurrent",
        "'many'",
    ),
    "unknown-flag": ("run", lambda f: f.run("--spaec", "x"), "--spaec"),
    "name-escapes": (
        "run",
        lambda f: f.run("--name", "../../escape"),
        S,
        "'--name'",
        "'../../escape'",
    ),
    "name-is-a-path": ("run", lambda f: f.run("--name", "a/b"), S, "'--name'", "'a/b'"),
    "resume-unreadable-plan": (
        "run",
        lambda f: f.run("--resume", "--name", f.stored_plan("old", "{")),
        "'--resume'",
        T + "/results/old/tune_kd_plan.json",
        "not a readable plan",
    ),
    "resume-nothing": (
        "run",
        lambda f: f.run("--resume"),
        S,
        "'--resume'",
        "no unfinished experiment",
    ),
    "storage-is-a-file": (
        "run",
        lambda f: f.run_text(yaml.safe_dump(GOOD), "--storage", f.write("file", "x")),
        "'--storage'",
        T + "/file",
        "is a file",
    ),
    "storage-below-a-file": (
        "run",
        lambda f: f.run_text(yaml.safe_dump(GOOD), "--storage", f.write("file", "x") + "/results"),
        "'--storage'",
        T + "/file",
        "is a file",
    ),
    # --- teacher checkpoints of a sweep
    "no-teacher-checkpoint": (
        "run",
        lambda f: f.run(**DISTIL),
        S,
        "'teacher_checkpoints'",
        "no checkpoint for teacher 'resnet14'",
    ),
    "missing-checkpoint": (
        "run",
        lambda f: f.distil_run(f.tmp / "gone.pth"),
        S,
        "'teacher_checkpoints.resnet14'",
        "gone.pth",
        "does not exist",
    ),
    "text-checkpoint": (
        "run",
        lambda f: f.distil_run(f.text_checkpoint()),
        S,
        "'teacher_checkpoints.resnet14'",
        "ckpt_epoch_240.pth",
        "not a PyTorch checkpoint",
    ),
    "checkpoint-of-another-model": (
        "run",
        lambda f: f.distil_run(f.other_arch()),
        S,
        "'teacher_checkpoints.resnet14'",
        "resnet8.pth",
        "look like resnet8",
    ),
    "checkpoint-of-other-classes": (
        "run",
        lambda f: f.distil_run(f.other_classes()),
        S,
        "'teacher_checkpoints.resnet14'",
        "resnet14-100.pth",
        "100 classes",
    ),
    # --- train
    "train-missing-config": (
        "train",
        lambda f: ["--config", f"{f.tmp}/nowhere.yaml", "--out", str(f.out)],
        "nowhere.yaml",
        "cannot read",
    ),
    "train-config-of-a-sweep": (
        "train",
        lambda f: ["--config", f.run(grid={"seed": [0, 1]})[1], "--out", str(f.out)],
        S,
        "'grid'",
        "2 trials",
    ),
    "train-zero-epochs": ("train", lambda f: f.train("--epochs", "0"), "'epochs'", ">= 1"),
    "train-decay-beyond": (
        "train",
        lambda f: f.train("--set", "lr_decay_epochs=[9]"),
        "'lr_decay_epochs'",
        "beyond",
    ),
    "train-set-unknown-key": (
        "train",
        lambda f: f.train("--set", "lernrate=0.1"),
        "'lernrate'",
        "unknown key",
    ),
    "train-flag-python-tag": (
        "train",
        lambda f: f.train("--lr", f.python_tag),
        "'lr'",
        "not a YAML value",
    ),
    "train-unknown-flag": ("train", lambda f: f.train("--lernrate", "0.1"), "--lernrate"),
    "train-missing-checkpoint": (
        "train",
        lambda f: f.distil_train(f.tmp / "gone.pth"),
        "'teacher_checkpoint'",
        "gone.pth",
        "does not exist",
    ),
    "train-text-checkpoint": (
        "train",
        lambda f: f.distil_train(f.text_checkpoint()),
        "'teacher_checkpoint'",
        "ckpt_epoch_240.pth",
        "not a PyTorch checkpoint",
    ),
    "train-checkpoint-of-another-model": (
        "train",
        lambda f: f.distil_train(f.other_arch()),
        "'teacher_checkpoint'",
        "resnet8.pth",
        "look like resnet8",
    ),
    "train-checkpoint-of-other-classes": (
        "train",
        lambda f: f.distil_train(f.other_classes()),
        "'teacher_checkpoint'",
        "resnet14-100.pth",
        "100 classes",
    ),
    "train-resume-nothing": (
        "train",
        lambda f: f.train("--resume"),
        "'--resume'",
        T + "/run/checkpoint.pt",
    ),
    "train-out-is-a-file": (
        "train",
        lambda f: f.train("--out", f.write("file", "x")),
        "'--out'",
        T + "/file",
        "is a file",
    ),
    # --- analysis
    "analysis-no-such-path": (
        "analysis",
        lambda f: [f"{f.tmp}/nowhere"],
        T + "/nowhere",
        "no experiment",
    ),
    "analysis-not-an-experiment": (
        "analysis",
        lambda f: [f.experiment(None)],
        T + "/experiment",
        "tune_kd_plan.json",
    ),
    "analysis-a-file": (
        "analysis",
        lambda f: [f.write("file", "x")],
        T + "/file",
        "tune_kd_plan.json",
    ),
    "analysis-plan-not-json": (
        "analysis",
        lambda f: [f.experiment("{not json")],
        T + "/experiment/tune_kd_plan.json",
        "unreadable",
    ),
    "analysis-plan-not-a-mapping": (
        "analysis",
        lambda f: [f.experiment("[1, 2]")],
        T + "/experiment/tune_kd_plan.json",
        "not a plan",
    ),
    "analysis-bad-metric": (
        "analysis",
        lambda f: [str(f.tmp), "--metric", "worst"],
        "--metric",
        "'worst'",
    ),
    "analysis-no-argument": ("analysis", lambda f: [], "experiment"),
    "analysis-out-is-a-file": (
        "analysis",
        lambda f: [str(f.pending_experiment(f.tmp / "done")), "--out", f.write("file", "x")],
        T + "/file",
        "is a file",
    ),
}


def tree(folder: Path) -> list[tuple[str, int]]:
    """Every path under `folder` with its size (0 for folders)."""
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_size if p.is_file() else 0)
        for p in folder.rglob("*")
    )


def invoke(command: str, argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        status = MAINS[command](argv)
    except SystemExit as exit:  # argparse's usage errors
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line(status: int, out: str, err: str, expected: list[str]) -> None:
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert status == 2


@pytest.fixture
def files(tmp_path, pending_experiment, monkeypatch) -> Files:
    monkeypatch.chdir(tmp_path)  # a default output folder (runs/...) would show in the tree
    monkeypatch.setattr(run, "start_ray", lambda address: pytest.fail("bad input reached Ray"))
    return Files(tmp_path, pending_experiment)


def test_the_table_covers_the_issue():
    assert len(CASES) >= 30
    assert {command for command, *_ in CASES.values()} == set(MAINS)


def build(case: str, files: Files) -> tuple[str, list[str], list[str]]:
    """A case's command, arguments and expected texts."""
    command, arguments, *texts = CASES[case]
    argv = arguments(files)
    return command, argv, [t.format(space=files.space_file, tmp=files.tmp) for t in texts]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, files, capsys):
    command, argv, expected = build(case, files)
    before = tree(files.tmp)
    status, out, err = invoke(command, argv, capsys)
    assert_one_line(status, out, err, expected)
    assert tree(files.tmp) == before
    assert not files.marker.exists()


def test_a_read_only_storage_is_refused_before_anything_starts(files, capsys, monkeypatch):
    """Root may write into a read-only folder: run as root, os.access is made to answer for the
    folder as it does for any other user."""
    folder = files.tmp / "read-only"
    folder.mkdir(mode=0o555)
    argv = files.run("--storage", str(folder / "results"))
    if os.geteuid() == 0:
        monkeypatch.setattr(storage.os, "access", lambda path, mode: Path(path) != folder)
    status, out, err = invoke("run", argv, capsys)
    assert_one_line(status, out, err, ["'--storage'", str(folder), "read-only"])
    assert list(folder.iterdir()) == []


def test_an_alias_bomb_is_refused_in_bounded_memory():
    """10**12 values in 13 lines: refused by counting, without expanding or copying them."""
    text = alias_bomb(12)
    tracemalloc.start()
    try:
        with pytest.raises(SpaceError, match="aliases") as error:
            space.load_text(f"grid: {{seed: {text}}}", "bomb.yaml")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert error.value.key == "grid"
    assert peak < 20 * 2**20


SUBPROCESS_CASES = ["binary-garbage", "train-flag-python-tag", "analysis-not-an-experiment"]


def test_bad_input_to_the_real_commands(files):
    """One case of each command as `python -m ...`, all at once."""
    cases = [build(case, files) for case in SUBPROCESS_CASES]
    before = tree(files.tmp)
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", f"tune_kd.{command}", *argv],
            cwd=files.tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for command, argv, _ in cases
    ]
    for process, (_, _, expected) in zip(processes, cases):
        out, err = process.communicate(timeout=300)
        assert_one_line(process.returncode, out, err, expected)
    assert tree(files.tmp) == before
    assert not files.marker.exists()
