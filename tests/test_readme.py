"""The README's commands for this machine run as printed (only shrunk by appended `--set` values),
in a copy of the project's search spaces, and its debug run of one configuration reports what the
sweep's trial of the same values reported, epoch by epoch."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, result_lines

pytestmark = pytest.mark.e2e

# The README's sections of commands run on this machine (the cluster's are tested elsewhere).
LOCAL_SECTIONS = ("## Set-up", "## A sweep, step by step")
# What the README's placeholders stand for here.
SPACE_FILE = "search_spaces/quickstart.yaml"
# Sizes shrunk for a test: the same on every command, so that the sweep's teacher is the run's.
SHRINK = (
    "epochs=2",
    "lr_decay_epochs=[1]",
    "synthetic_train_size=192",  # a second thread would sum its batches otherwise
    "synthetic_test_size=32",
    "teacher_train.epochs=1",
    "teacher_train.lr_decay_epochs=[1]",
)


def local_commands(readme: str) -> list[str]:
    """Every distinct `python -m tune_kd...` command of the local sections, in reading order, with
    `FILE` standing for the quickstart's space file: from code lines (an ending `\\` continues a
    line) and from inline code, each part of an `a && b` line. The set-up's venv, pip and pytest
    commands and the notebook's nbconvert are not tune_kd's and are left out."""
    found: list[str] = []
    for section in re.split(r"^(?=## )", readme, flags=re.MULTILINE):
        if not section.startswith(LOCAL_SECTIONS):
            continue
        unfenced = re.sub(r"```.*?```", "", section, flags=re.DOTALL)
        joined = re.sub(r"\\\n\s*", " ", unfenced)
        flat = re.sub(r"\s+", " ", joined)
        blocks = [line.strip() for line in joined.splitlines() if line.startswith("    ")]
        spans = re.findall(r"`([^`]+)`", flat)
        for text in sorted([*blocks, *spans], key=flat.find):
            for part in text.split("&&"):
                command = part.strip().replace(" FILE", f" {SPACE_FILE}")
                if command.startswith("python -m tune_kd") and command not in found:
                    found.append(command)
    return found


def debug_values(commands: list[str]) -> list[str]:
    """The `--set` values of the README's debug run: the one trial the test's sweep runs."""
    [debug] = [c for c in commands if c.startswith("python -m tune_kd.train --config")]
    words = shlex.split(debug)
    return [words[i + 1] for i, word in enumerate(words) if word == "--set"]


def as_run_here(command: str, experiment: str | None, trial: list[str]) -> list[str]:
    """The README's `command` with its placeholders filled in and the test's `--set` appended."""
    words = shlex.split(command)
    if experiment is not None:
        words = [w.replace("results/<experiment>", f"results/{experiment}") for w in words]
    assert not any("<" in w for w in words), f"a placeholder this test cannot fill: {command}"
    extra = list(SHRINK)
    if words[2] == "tune_kd.run":
        extra += trial
    if ("--space" in words or "--config" in words) and "--help" not in words:
        words += [item for value in extra for item in ("--set", value)]
    return [sys.executable, *words[1:]]


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> tuple[Path, list[tuple[str, subprocess.CompletedProcess]]]:
    """Every local command of the README, run in order in a folder holding the search spaces."""
    folder = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "search_spaces", folder / "search_spaces")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    commands = local_commands((ROOT / "README.md").read_text())
    trial = debug_values(commands)
    ran = []
    for command in commands:
        experiments = sorted((folder / "results").glob("quickstart-*"))
        experiment = experiments[-1].name if experiments else None
        argv = as_run_here(command, experiment, trial)
        done = subprocess.run(
            argv, cwd=folder, env=env, capture_output=True, text=True, timeout=900
        )
        ran.append((shlex.join(argv[1:]), done))
    return folder, ran


def test_the_readme_lists_its_local_commands():
    commands = local_commands((ROOT / "README.md").read_text())
    run_commands = [c for c in commands if c.startswith("python -m tune_kd.run")]
    assert f"python -m tune_kd.run --space {SPACE_FILE}" in commands
    assert any("--dry-run" in c for c in run_commands)
    assert any("--resume" in c for c in run_commands)
    assert any(c.startswith("python -m tune_kd.train --config") for c in commands)
    assert any(c.startswith("python -m tune_kd.analysis") for c in commands)


def test_every_local_command_of_the_readme_runs_as_printed(readme_run):
    """Each succeeds, except `--resume`: the README's sweep ran to its end, so there is nothing to
    continue, which it says in one line with exit status 2."""
    _, ran = readme_run
    for command, done in ran:
        assert "Traceback" not in done.stderr, command
        if "--resume" in command:
            assert done.returncode == 2, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
            assert "no unfinished experiment" in done.stderr
            continue
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def test_the_debug_run_reports_the_sweeps_trial_and_reuses_its_teacher(readme_run):
    folder, ran = readme_run
    [debug] = [done for command, done in ran if command.startswith("-m tune_kd.train --config")]
    assert debug.returncode == 0, debug.stderr
    assert "teacher(s) first" not in debug.stdout  # the sweep's cached teacher
    [experiment] = sorted((folder / "results").glob("quickstart-*"))
    [trial] = [p.parent for p in experiment.glob("*/result.json")]
    [run] = sorted((folder / "runs").glob("*"))
    alone = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    swept = result_lines(trial)
    keys = ("epoch", "train_loss", "test_acc")
    assert len(swept) == len(alone) == 2
    assert [[row[k] for k in keys] for row in alone] == [[row[k] for k in keys] for row in swept]
