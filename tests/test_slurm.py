"""cluster/slurm.sbatch on a two-"node" allocation of this machine: stand-in `sbatch`, `srun` and
`scontrol` (tests/fake_slurm) start real Ray nodes here, each with its own temp folder and ports.
A sweep runs to its end with `--address auto`; a job stopped near its time limit is requeued and
its rerun (`--resume`) finishes without rerunning finished trials. The second trial is held
before its second epoch (tests/faults/sitecustomize.py) until the job is stopped, so the stop
always comes mid-trial. Only the Ray processes this test started are stopped: those whose command
line names its own temp folder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import epochs_of

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[1]
SPACE = """
name: slurm
dataset: synthetic
synthetic_classes: 10
synthetic_train_size: 96
synthetic_test_size: 64
student: resnet8
method: student
batch_size: 32
epochs: 3
lr_decay_epochs: [2]
grid:
  lr: [0.05, 0.1]
resources: {cpu: 1}
"""
HOLD_THE_SECOND_TRIAL = {"trial_0001": {"epoch": 2, "kind": "hold", "times": 1, "wait": True}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_of(root: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if process.pid != os.getpid() and any(
                str(root) in part for part in process.info["cmdline"] or []
            ):
                found.append(process)
        except psutil.Error:
            continue
    return found


@pytest.fixture
def allocation(inject_faults) -> Iterator[tuple[Path, dict[str, str]]]:
    """A folder for the fake nodes (short: Ray's socket paths have a length limit) and the
    environment of a job on them; every process left with the folder in its command line is
    killed at the end."""
    root = Path(tempfile.mkdtemp(prefix="tkd-slurm-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=os.pathsep.join(
            [str(ROOT / "tests" / "fake_slurm"), str(Path(sys.executable).parent), env["PATH"]]
        ),
        FAKE_SLURM_ROOT=str(root),
        TUNE_KD_RAY_PORT=str(free_port()),
        TUNE_KD_DASHBOARD_PORT=str(free_port()),
        TUNE_KD_RAY_START_ARGS="--object-store-memory=100000000 --disable-usage-stats",
        **inject_faults(HOLD_THE_SECOND_TRIAL, root / "faults.log"),
    )
    try:
        yield root, env
    finally:
        for process in processes_of(root):
            with contextlib.suppress(psutil.Error):
                process.kill()
        shutil.rmtree(root, ignore_errors=True)


def submit(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["sbatch", "cluster/slurm.sbatch", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_a_sweep_on_two_nodes_runs_stops_ray_and_resumes_after_a_requeue(allocation, tmp_path):
    root, env = allocation
    (tmp_path / "slurm.yaml").write_text(SPACE)
    storage = tmp_path / "results"
    args = ["--space", str(tmp_path / "slurm.yaml"), "--storage", str(storage), "--name", "s"]
    experiment = storage / "s"

    job = submit(env, *args, "--max-concurrent", "1")
    deadline = time.monotonic() + 400
    while "trial_0001 hold 2" not in (root / "faults.log").read_text():
        assert job.poll() is None, job.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the second trial never reached its second epoch"
        time.sleep(0.5)
    job.send_signal(signal.SIGUSR1)  # what SLURM sends near the time limit (--signal=B:USR1@..)
    first = job.communicate(timeout=300)[0]
    assert job.returncode == 0, first[-3000:]
    assert "2 node(s) joined" in first and "'CPU': 2.0" in first
    assert (root / "requeued").read_text() == "4242\n"
    assert not processes_of(root), "Ray nodes left running after the job"
    assert epochs_of(experiment / "trial_0000") == [1, 2, 3]
    assert epochs_of(experiment / "trial_0001") == [1]  # stopped before its end
    finished_before = (experiment / "trial_0000" / "result.json").read_text()

    rerun = submit({**env, "SLURM_RESTART_COUNT": "1"}, *args)  # as SLURM reruns a requeued job
    second = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, second[-3000:]
    assert f"resuming {experiment}" in second
    assert (experiment / "trial_0000" / "result.json").read_text() == finished_before
    assert epochs_of(experiment / "trial_0001") == [1, 2, 3]
    assert "2 planned: 2 completed" in second
    assert not processes_of(root), "Ray nodes left running after the job"
    plan = json.loads((experiment / "tune_kd_plan.json").read_text())
    assert plan["planned"] == 2
