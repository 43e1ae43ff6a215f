"""Sweeps under injected faults: a killed trial worker, a trial that raises, a diverging
configuration, a killed driver, a corrupt checkpoint, a lost node. Every planned trial must end up
finished or marked, and every epoch of every trial must appear exactly once.

Faults come from the test side: tests/faults/sitecustomize.py on the sweep's PYTHONPATH (Ray's
workers inherit it) makes `Run.train_epoch` raise or SIGKILL its own process at a chosen epoch of
a chosen trial; drivers and nodes are killed from here. Each Ray the tests start gets its own
RAY_TMPDIR, so it never meets another Ray of this machine, and is stopped at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from conftest import epochs_of, result_lines
from ray import tune

from tune_kd import analysis
from tune_kd.train import Run
from tune_kd.trainable import RUN_STATE, resume

ROOT = Path(__file__).parents[1]
SPACE = ROOT / "search_spaces" / "quickstart.yaml"
MAX_FAILURES = 1
FIRST_TWO = ("trial_0000", "trial_0001")
LOOPBACK = "127.0.0.1"  # every node of a test's cluster listens there only


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A short private RAY_TMPDIR (Ray's socket paths must stay under 108 characters)."""
    with tempfile.TemporaryDirectory(prefix="rf", dir="/tmp", ignore_cleanup_errors=True) as folder:
        yield Path(folder)


def sweep_env(ray_tmp: Path, injected: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a sweep: its own Ray folder and, if given, `inject_faults` variables."""
    return {**os.environ, "RAY_TMPDIR": str(ray_tmp), **(injected or {})}


def fault_log(ray_tmp: Path) -> list[str]:
    return (ray_tmp / "faults.log").read_text().splitlines()


def sweep_args(teacher: Path, storage: Path, *sets: str) -> list[str]:
    """A sweep of tiny SimKD trials distilling from `teacher`; `sets` are more `--set` values."""
    values = [
        "synthetic_train_size=128",
        "synthetic_test_size=64",
        "batch_size=32",
        "lr_decay_epochs=[2]",
        "loss=[l2]",
        f"teacher_checkpoint={teacher}",
        "resources={cpu: 1, gpu: 0}",
        *sets,
    ]
    options = [part for value in values for part in ("--set", value)]
    return ["--space", str(SPACE), *options, "--storage", str(storage)]


def start_sweep(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`python -m tune_kd.run` in a session of its own: the local Ray it starts is in it too."""
    return subprocess.Popen(
        [sys.executable, "-m", "tune_kd.run", *args],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def finish(process: subprocess.Popen, timeout: float) -> int:
    """Wait for a sweep, then kill whatever it left in its session (its local Ray)."""
    try:
        return process.wait(timeout=timeout)
    finally:
        stop_session(process)


def stop_session(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def wait_for(condition: Callable[[], bool], what: str, process: subprocess.Popen, timeout: float):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the sweep ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.2)


def results_of(experiment: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    folder = experiment / "results"
    return pd.read_parquet(folder / "trials.parquet"), pd.read_parquet(folder / "epochs.parquet")


def epochs_per_trial(epochs: pd.DataFrame) -> dict[str, list[int]]:
    return {t: sorted(e["epoch"]) for t, e in epochs.groupby("trial_id")}


@pytest.mark.e2e
@pytest.mark.faults
def test_killed_and_raising_trials_are_retried_then_marked_and_divergence_costs_nothing(
    teacher_checkpoint, tmp_path, ray_tmp, inject_faults
):
    """trial_0000's worker is SIGKILLed once at epoch 2: retried from its checkpoint, it finishes.
    Before the kill, the storage's copy of its results is made to lack epoch 1, as when Tune last
    copied them there before the trial's first report: the retry must not lose epoch 1.
    trial_0001 raises at epoch 2 every time: retried `MAX_FAILURES` times from its checkpoint,
    then marked error. trial_0002 and trial_0003 (lr 1e30) diverge in their first epoch."""
    faults = {
        "trial_0000": {"epoch": 2, "kind": "kill", "times": 1, "wait": True},
        "trial_0001": {"epoch": 2, "kind": "raise", "times": 99},
    }
    sets = ["epochs=3", "lr=[0.05, 1.0e+30]", "seed=[0, 1]"]
    args = [*sweep_args(teacher_checkpoint, tmp_path, *sets), "--name", "faults"]
    args += ["--max-failures", str(MAX_FAILURES)]
    log = tmp_path / "sweep.log"
    env = sweep_env(ray_tmp, inject_faults(faults, ray_tmp / "faults.log"))
    env["TUNE_GLOBAL_CHECKPOINT_S"] = "3600"  # no copy to the storage but those the test makes
    experiment = tmp_path / "faults"
    process = start_sweep(args, env, log)
    try:
        wait_for(lambda: "trial_0000 kill 2" in fault_log(ray_tmp), "the kill", process, 600)
        stale = experiment / "trial_0000" / "result.json"
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_text("")
        Path(f"{ray_tmp / 'faults.log'}.trial_0000.go").touch()
    except BaseException:
        stop_session(process)
        raise
    status = finish(process, timeout=900)
    output = log.read_text()
    assert status == 1, output[-3000:]
    plan = json.loads((experiment / "tune_kd_plan.json").read_text())
    assert [(t["axes"]["lr"], t["axes"]["seed"]) for t in plan["trials"]] == [
        (0.05, 0),
        (0.05, 1),
        (1e30, 0),
        (1e30, 1),
    ]
    assert fault_log(ray_tmp).count("trial_0000 kill 2") == 1
    assert fault_log(ray_tmp).count("trial_0001 raise 2") == MAX_FAILURES + 1
    # each retry started where the last checkpoint left off, not from the beginning
    starts = [line for line in fault_log(ray_tmp) if " start " in line]
    assert starts.count("trial_0000 start 1") == 1 and starts.count("trial_0000 start 0") == 1
    assert starts.count("trial_0001 start 1") == MAX_FAILURES
    assert sorted(s for s in starts if s.startswith(("trial_0002", "trial_0003"))) == [
        "trial_0002 start 0",
        "trial_0003 start 0",
    ]

    trials, epochs = results_of(experiment)
    statuses = dict(zip(trials["trial_id"], trials["status"]))
    assert statuses == {
        "trial_0000": "completed",
        "trial_0001": "error",
        "trial_0002": "diverged",
        "trial_0003": "diverged",
    }
    assert epochs_per_trial(epochs) == {
        "trial_0000": [1, 2, 3],
        "trial_0001": [1],
        "trial_0002": [1],
        "trial_0003": [1],
    }
    for diverged in ("trial_0002", "trial_0003"):  # no retry: one report, no error file
        assert epochs_of(experiment / diverged) == [1]
        assert not (experiment / diverged / "error.txt").exists()
    error = trials.set_index("trial_id").loc["trial_0001", "error"]
    assert "RuntimeError: injected fault at epoch 2" in error
    summary = (experiment / "results" / "summary.md").read_text()
    assert "4 planned: 1 completed, 2 diverged, 1 error" in summary
    assert "trial_0001" in summary and "injected fault at epoch 2" in summary
    assert "1 completed, 2 diverged, 1 error" in output
    assert "error: 1 of 4 trials failed" in output
    assert "injected fault at epoch 2" in output.rsplit("per grid cell", 1)[-1]


def worker_logs(ray_tmp: Path) -> str:
    """What the trials of the Rays started under `ray_tmp` wrote to stderr."""
    files = (ray_tmp / "ray").glob("session_*/logs/worker-*.err")
    return "".join(path.read_text(errors="replace") for path in files)


def newest_checkpoint(trial: Path) -> Path:
    return max(trial.glob("checkpoint_*"))


@pytest.mark.e2e
@pytest.mark.faults
def test_a_killed_driver_resumes_and_a_corrupt_checkpoint_falls_back_to_the_one_before(
    teacher_checkpoint, tmp_path, ray_tmp, inject_faults
):
    """Three trials, one at a time. trial_0001's newest checkpoint (epoch 2) is cut in half, then
    its worker is killed: the retry resumes from epoch 1's. While trial_0002 is held in its second
    epoch, `python -m tune_kd.analysis` reads the running experiment, then the driver is SIGKILLed;
    `--resume` finishes the sweep without running trial_0000 or trial_0001 again."""
    faults = {
        "trial_0001": {"epoch": 3, "kind": "kill", "times": 1, "wait": True},
        "trial_0002": {"epoch": 2, "kind": "hold", "times": 1, "wait": True},  # never let go
    }
    env = sweep_env(ray_tmp, inject_faults(faults, ray_tmp / "faults.log"))
    sets = ["epochs=3", "lr=[0.05]", "seed=[0, 1, 2]"]
    args = sweep_args(teacher_checkpoint, tmp_path, *sets)
    experiment = tmp_path / "killed"
    process = start_sweep([*args, "--name", "killed", "--max-concurrent", "1"], env, tmp_path / "1")
    try:
        wait_for(lambda: "trial_0001 kill 3" in fault_log(ray_tmp), "the kill", process, 600)
        wait_for(lambda: epochs_of(experiment / "trial_0001") == [1, 2], "epoch 2", process, 60)
        cut = newest_checkpoint(experiment / "trial_0001") / "run.pt"
        assert torch.load(cut, weights_only=True)["epoch"] == 2
        cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
        Path(f"{ray_tmp / 'faults.log'}.trial_0001.go").touch()

        wait_for(lambda: "trial_0002 hold 2" in fault_log(ray_tmp), "the hold", process, 600)
        # Tune copies its state and results to the storage every 10 s or more: wait for it
        wait_for(lambda: epochs_of(experiment / "trial_0002") == [1], "a copy", process, 300)
        status = analysis.main([str(experiment), "--out", str(tmp_path / "while-running")])
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        stop_session(process)
    assert status == 0
    running = pd.read_parquet(tmp_path / "while-running" / "trials.parquet")
    assert list(running["status"]) == ["completed", "completed", "running"]
    assert epochs_of(experiment / "trial_0002") == [1]  # interrupted in its second epoch
    finished = {
        t: (experiment / t / "result.json").read_text() for t in ("trial_0000", "trial_0001")
    }

    log = tmp_path / "resumed.log"
    resume = ["--resume", "--name", "killed", "--storage", str(tmp_path), "--space", str(SPACE)]
    status = finish(start_sweep(resume, sweep_env(ray_tmp), log), timeout=600)
    assert status == 0, log.read_text()[-3000:]

    for trial, text in finished.items():  # not run again
        assert (experiment / trial / "result.json").read_text() == text
    assert epochs_of(experiment / "trial_0001") == [1, 2, 2, 3]  # epoch 2 again, from epoch 1's
    assert fault_log(ray_tmp).count("trial_0001 start 1") == 1
    assert "unreadable checkpoint checkpoint_000001 (" in worker_logs(ray_tmp)
    assert "resuming from checkpoint_000000, epoch 1" in worker_logs(ray_tmp)
    trials, epochs = results_of(experiment)
    assert len(trials) == 3 and set(trials["status"]) == {"completed"}
    assert epochs_per_trial(epochs) == {t: [1, 2, 3] for t in trials["trial_id"]}
    assert "3 planned: 3 completed" in log.read_text()


def saved_runs(config: dict, folder: Path, epochs: int) -> list[Path]:
    """Tune's layout of a trial's checkpoints: `checkpoint_00000<k>/run.pt` after epoch k + 1."""
    run = Run([config])
    paths = []
    for k in range(epochs):
        run.train_epoch()
        path = folder / f"checkpoint_{k:06d}" / RUN_STATE
        path.parent.mkdir(parents=True)
        run.save(path)
        paths.append(path)
    return paths


def test_a_corrupt_checkpoint_falls_back_to_the_one_before_or_starts_over(tmp_path, tiny, capsys):
    config = {**tiny, "method": "student", "epochs": 3}
    first, second = saved_runs(config, tmp_path, epochs=2)
    newest = tune.Checkpoint.from_directory(str(second.parent))
    run = resume(lambda: Run([config]), newest)
    assert run.epoch == 2 and capsys.readouterr().err == ""  # readable: nothing said

    second.write_bytes(second.read_bytes()[:100])
    run = resume(lambda: Run([config]), newest)
    assert run.epoch == 1
    expected = torch.load(first, weights_only=True)["members"][0]["distiller"]
    for key, value in run.members[0].distiller.state_dict().items():
        assert torch.equal(value, expected[key])
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and "checkpoint_000001 (" in line
    assert line.endswith("resuming from checkpoint_000000, epoch 1\n")

    first.write_bytes(b"not a checkpoint")
    run = resume(lambda: Run([config]), newest)
    assert run.epoch == 0 and not run.done
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and "checkpoint_000001 (" in line and "checkpoint_000000 (" in line
    assert line.endswith("starting over from epoch 0\n")


# Each lost node is struck while the trial on it is held at the start of its second epoch.
HELD = {
    folder: {"epoch": 2, "kind": "hold", "times": 1, "wait": True}
    for folder in ("trial_0000", "group_0000")
}


@pytest.fixture
def cluster(ray_tmp, monkeypatch, inject_faults) -> Iterator[Any]:
    """A Ray of three nodes on this machine: a head without CPUs (the driver's) and two workers
    of one CPU each, so that each trial has a node of its own. Its workers hold `HELD`."""
    from ray.cluster_utils import Cluster

    env = sweep_env(ray_tmp, inject_faults(HELD, ray_tmp / "faults.log"))
    for key, value in env.items():  # for the nodes' processes
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)  # RAY_TMPDIR: its address file too stays private
    # The sweeps' `--address 127.0.0.1:PORT` stays on 127.0.0.1 only where Ray runs on one
    # machine (as on macOS): elsewhere Ray replaces it with the machine's network address.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    cluster = Cluster(shutdown_at_exit=False)
    try:
        cluster.add_node(num_cpus=0, node_ip_address=LOOPBACK)
        for _ in range(2):
            cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def node_of(cluster: Any, pid: int) -> Any:
    """The worker node whose processes started the process `pid`."""
    import psutil

    ancestors = {p.pid for p in psutil.Process(pid).parents()}
    for node in cluster.worker_nodes:
        pids = {info.process.pid for infos in node.all_processes.values() for info in infos}
        if pids & ancestors:
            return node
    raise AssertionError(f"process {pid} runs on no worker node")


def staged(ray_tmp: Path, name: str, folder: str) -> Path:
    """A trial's folder where the driver writes its results first (Tune copies them to the
    storage every 10 s or more)."""
    found = list((ray_tmp / "ray").glob(f"session_*/artifacts/*/{name}/driver_artifacts/{folder}"))
    return found[0] if found else ray_tmp / "not yet"


def strike_a_node(cluster: Any, ray_tmp: Path, args: list[str], name: str, folder: str) -> int:
    """Run a sweep on `cluster`; once the trial `folder` is held after its first epoch, remove the
    node it runs on, and add a fresh one. Returns the sweep's exit status."""
    env = sweep_env(ray_tmp)
    process = start_sweep([*args, "--address", cluster.address], env, ray_tmp / f"{name}.log")
    try:
        wait_for(
            lambda: (
                f"{folder} hold 2" in fault_log(ray_tmp)
                and epochs_of(staged(ray_tmp, name, folder)) == [1]
            ),
            "a first epoch",
            process,
            600,
        )
        pid = result_lines(staged(ray_tmp, name, folder))[0]["pid"]
        cluster.remove_node(node_of(cluster, pid), allow_graceful=False)
        cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK)
    except BaseException:
        stop_session(process)
        raise
    return finish(process, timeout=600)


@pytest.mark.e2e
@pytest.mark.faults
def test_trials_on_a_lost_node_resume_from_their_checkpoints(
    cluster, teacher_checkpoint, tmp_path, ray_tmp
):
    """Two lone trials, then two groups of two students, on the cluster; the node running
    trial_0000, then group_0000, is removed while it is held after its first epoch."""
    sets = ["epochs=3", "lr=[0.05]", "seed=[0, 1]"]
    for name, folder, more in (
        ("lone", "trial_0000", []),
        ("groups", "group_0000", ["group_students=true", "loss=[l2, kl]"]),
    ):
        args = [*sweep_args(teacher_checkpoint, tmp_path, *sets, *more), "--name", name]
        status = strike_a_node(cluster, ray_tmp, args, name, folder)
        assert status == 0, (ray_tmp / f"{name}.log").read_text()[-3000:]

        struck = tmp_path / name / folder
        lines = result_lines(struck)
        assert [line["epoch"] for line in lines] == [1, 2, 3]  # went on from epoch 1's checkpoint
        assert lines[0]["pid"] != lines[1]["pid"]  # in another worker
        assert fault_log(ray_tmp).count(f"{folder} start 1") == 1
        assert (struck / "error.txt").exists()  # the lost node counted as a failure
        trials, epochs = results_of(tmp_path / name)
        assert len(trials) == (2 if name == "lone" else 4)
        assert set(trials["status"]) == {"completed"}
        assert epochs_per_trial(epochs) == {t: [1, 2, 3] for t in trials["trial_id"]}
