"""cluster/slurm.sbatch, submitted with the real `sbatch` to a private one-node SLURM
(tests/slurm_cluster.py), and on two "nodes" of stand-ins for what one machine cannot show.

On the real SLURM (marker `e2e`): a sweep runs to its end; the time limit's signal
(`scancel --signal=USR1 --batch`, what `--signal=B:USR1@..` does) comes in the middle of a
trial, in the job's first seconds, after the sweep ended, while the teacher trains, or in a
rerun's first seconds again; an admin requeues the job in the middle of a trial. Each case checks
the job's final state and exit code, that it was requeued or not, that every trial finished once
with each epoch counted once, that each run drained its Ray rather than killing it (but where
SLURM kills the run), and that no process of the job is left. Each job's Ray listens on
127.0.0.1 only, in a temp folder and on ports of its own, so it never meets another Ray of this
machine.

With stand-ins (tests/fake_slurm: `sbatch`, `srun` and `scontrol` that start real Ray nodes
here, each with its own temp folder and ports): a worker node joins the head, both are stopped,
and a rerun after a requeue (`--resume`) finishes without rerunning finished trials. The second
trial is held before its second epoch (tests/faults/sitecustomize.py) until the job is stopped,
so the stop always comes mid-trial."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import pytest
from conftest import epochs_of
from slurm_cluster import Cluster, missing_daemons, private_slurm

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[1]
SPACE = """
name: tiny
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
TEACHER_SPACE = (
    SPACE.replace("method: student", "method: simkd\nteacher: resnet14")
    .replace("grid:", "teacher_train: {epochs: 3, lr_decay_epochs: [2]}\ngrid:")
    .replace("lr: [0.05, 0.1]", "lr: [0.05]")
)
TRIALS = ("trial_0000", "trial_0001")
HOLD = {"kind": "hold", "times": 1, "wait": True}
HOLD_THE_SECOND_TRIAL = {"trial_0001": {"epoch": 2, **HOLD}}
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_of(root: Path) -> list[psutil.Process]:
    """Processes, but this one, whose command line or environment names `root`: a job's (its
    Ray's temp folder and its fault log are in `root`)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            words = [*(process.info["cmdline"] or []), *process.environ().values()]
            if process.pid != os.getpid() and any(str(root) in word for word in words):
                found.append(process)
    return found


def still_running(root: Path, grace: float = 30) -> list[str]:
    """The command lines of `root`'s processes still running `grace` seconds from now: Ray's
    processes may take a few seconds to exit after `ray start` has stopped the node."""
    _, alive = psutil.wait_procs(processes_of(root), timeout=grace)
    lines = []
    for process in alive:
        with contextlib.suppress(psutil.Error):
            lines.append(" ".join(process.cmdline()))
    return lines


def ray_environment(root: Path | None, **ports: int) -> dict[str, str]:
    """This environment without Ray's or SLURM's variables, plus the job's own Ray ports and
    temp folder (`root/ray`): `ray start` flags for `ports` it would otherwise take from a fixed
    default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SLURM_"))}
    flags = [f"--{flag.replace('_', '-')}={port}" for flag, port in ports.items()]
    env.update(
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]]),
        TUNE_KD_RAY_PORT=str(free_port()),
        TUNE_KD_DASHBOARD_PORT=str(free_port()),
        TUNE_KD_RAY_START_ARGS=" ".join(
            ["--object-store-memory=100000000", "--disable-usage-stats", *flags]
        ),
    )
    if root is not None:
        env["TUNE_KD_RAY_START_ARGS"] += f" --temp-dir={root / 'ray'}"
    return env


# ----------------------------------------------------------------------------- a real SLURM


@pytest.fixture(scope="module")
def slurm() -> Iterator[Cluster]:
    missing = missing_daemons()
    if missing:
        pytest.skip(
            f"SLURM is not installed ({', '.join(missing)} not found): "
            "`apt-get install slurm-wlm munge` (.ci/run does)"
        )
    root = Path(tempfile.mkdtemp(prefix="tkd-slurmctld-", dir="/tmp"))
    try:
        with private_slurm(root) as cluster:
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Sweep:
    """The tiny sweep as a job of the private SLURM; its Ray, fault log and job log in `root`."""

    cluster: Cluster
    root: Path
    space: Path
    storage: Path
    env: dict[str, str]
    job_id: int = 0

    def submit(self) -> None:
        self.job_id = self.cluster.submit(
            "--nodes=1",
            f"--cpus-per-task={os.cpu_count()}",
            f"--output={self.root}/job-%j.log",
            "cluster/slurm.sbatch",
            *("--space", str(self.space), "--storage", str(self.storage)),
            *("--max-concurrent", "1"),
            cwd=ROOT,
            env=self.env,
        )

    @property
    def log(self) -> str:
        path = self.root / f"job-{self.job_id}.log"
        return path.read_text() if path.exists() else ""

    @property
    def faults(self) -> list[str]:
        return (self.root / "faults.log").read_text().splitlines()

    @property
    def experiment(self) -> Path:
        return self.storage / f"tiny-slurm{self.job_id}"  # the script's name for it

    def wait_for(self, condition: Callable[[], object], what: str) -> None:
        """Wait up to 5 minutes for `condition`; else fail with the job's state and log."""
        deadline = time.monotonic() + 300
        while not condition():
            if time.monotonic() > deadline:
                job = self.cluster.job(self.job_id)
                state = f"{job['JobState']} ({job['Reason']})"
                pytest.fail(f"timed out waiting for {what}; job {state}, log: {self.log[-3000:]}")
            time.sleep(0.2)

    def signal_time_limit(self) -> None:
        """What `#SBATCH --signal=B:USR1@300` does 300 s before the time limit."""
        self.cluster.command("scancel", "--signal=USR1", "--batch", str(self.job_id))

    def listening(self) -> set[str]:
        """The addresses the job's processes listen on now."""
        pids = {p.pid for p in processes_of(self.root)}
        return {
            c.laddr.ip
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids
        }

    def completions(self) -> list[str]:
        """The job completion log's lines of this job (one per run)."""
        lines = (self.cluster.root / "log" / "jobcomp.txt").read_text().splitlines()
        return [line for line in lines if line.startswith(f"JobId={self.job_id} ")]


@pytest.fixture
def sweep(slurm, inject_faults, tmp_path) -> Iterator[Sweep]:
    """A sweep of two 3-epoch trials, one at a time, whose second trial is held before its
    second epoch until the job is stopped or the test releases it; a job still running at the
    end is cancelled."""
    root = Path(tempfile.mkdtemp(prefix="tkd-job-", dir="/tmp"))  # short: Ray's socket paths
    (tmp_path / "tiny.yaml").write_text(SPACE)
    env = ray_environment(
        root, dashboard_agent_listen_port=free_port(), ray_client_server_port=free_port()
    )
    env.update(
        TUNE_KD_HEAD_ADDRESS="127.0.0.1",
        **inject_faults(HOLD_THE_SECOND_TRIAL, root / "faults.log"),
    )
    job = Sweep(slurm, root, tmp_path / "tiny.yaml", tmp_path / "results", env)
    try:
        yield job
    finally:
        if job.job_id:
            with contextlib.suppress(RuntimeError, TimeoutError):
                slurm.command("scancel", str(job.job_id))
                slurm.wait_until_ended(job.job_id, restarts=0, timeout=120)
        for process in processes_of(job.root):
            with contextlib.suppress(psutil.Error):
                process.kill()
        shutil.rmtree(root, ignore_errors=True)


def release_the_second_trial(sweep: Sweep) -> None:
    (sweep.root / "faults.log.trial_0001.go").touch()


def check_completed(
    sweep: Sweep, restarts: int, trials: tuple[str, ...] = TRIALS, errors: tuple[str, ...] = ()
) -> None:
    """The job ended COMPLETED after `restarts` requeues, each run with exit code 0 and its
    node's Ray drained and stopped; every trial finished once with epochs 1-3, each once; no
    process of the job left. No error in the log but lines that contain one of `errors`."""
    try:
        job = sweep.cluster.wait_until_ended(sweep.job_id, restarts, timeout=600)
    except TimeoutError as error:
        pytest.fail(f"{error}; its log ends: {sweep.log[-3000:]}")
    log = sweep.log
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert job["Restarts"] == str(restarts)
    runs = sweep.completions()
    assert len(runs) == restarts + 1 and all("DerivedExitCode=0:0 " in run for run in runs), runs
    assert log.count("stopping Ray on 1 node(s)") == restarts + 1
    assert log.count("Local node finished draining") == restarts + 1, log[-3000:]
    # `scontrol requeue` ends the batch script itself, after it stopped Ray: SLURM logs that.
    lines = log.splitlines()
    requeue = re.compile(r".*\*\*\* JOB \d+ ON \S+ CANCELLED AT \S+ DUE TO JOB REQUEUE \*\*\*")
    others = [line for line in lines if not requeue.fullmatch(line)]
    assert len(lines) - len(others) <= restarts
    others = [line for line in others if not any(error in line for error in errors)]
    for killed in ("Killed", "CANCELLED", "forcing job termination", "error:"):
        assert not [line for line in others if killed in line], log[-3000:]
    assert f"trials: {len(trials)} planned: {len(trials)} completed" in log
    for trial in trials:
        assert epochs_of(sweep.experiment / trial) == [1, 2, 3]
    assert not still_running(sweep.root), "processes of the job left after it ended"


def test_a_sweep_runs_to_its_end_with_ray_on_the_loopback_address(sweep):
    release_the_second_trial(sweep)
    sweep.submit()
    sweep.wait_for(lambda: "trial_0000 start 0" in sweep.faults, "the first trial")
    listening = sweep.listening()
    assert listening and listening <= LOOPBACK, listening
    check_completed(sweep, restarts=0)
    assert sweep.log.count("node(s) joined") == 1 and "'node:127.0.0.1'" in sweep.log
    assert "time limit near" not in sweep.log


def test_the_time_limit_in_the_middle_of_a_trial_requeues_and_the_rerun_resumes(sweep):
    sweep.submit()
    sweep.wait_for(lambda: "trial_0001 hold 2" in sweep.faults, "the second trial's second epoch")
    sweep.signal_time_limit()
    check_completed(sweep, restarts=1)
    assert sweep.log.count("time limit near") == 1
    assert f"resuming {sweep.experiment}" in sweep.log
    starts = [line for line in sweep.faults if " start " in line]
    assert starts == ["trial_0000 start 0", "trial_0001 start 0", "trial_0001 start 1"]


def test_the_time_limit_in_the_first_seconds_requeues_and_the_rerun_starts_the_sweep(sweep):
    release_the_second_trial(sweep)
    sweep.submit()
    sweep.wait_for(lambda: "Local node IP" in sweep.log, "Ray to start")
    sweep.signal_time_limit()
    check_completed(sweep, restarts=1)
    assert sweep.log.count("time limit near") == 1 and "resuming" not in sweep.log
    starts = [line for line in sweep.faults if " start " in line]
    assert starts == ["trial_0000 start 0", "trial_0001 start 0"]  # nothing ran before


def test_the_time_limit_after_the_sweep_ended_does_not_requeue(sweep):
    release_the_second_trial(sweep)
    sweep.submit()
    sweep.wait_for(lambda: "trials: 2 planned" in sweep.log, "the sweep's summary")
    sweep.signal_time_limit()
    check_completed(sweep, restarts=0)
    assert "the sweep had ended: the job is not requeued" in sweep.log


def test_an_admins_requeue_in_the_middle_of_a_trial_kills_the_run_and_the_rerun_resumes(sweep):
    sweep.submit()
    sweep.wait_for(lambda: "trial_0001 hold 2" in sweep.faults, "the second trial's second epoch")
    sweep.cluster.command("scontrol", "requeue", str(sweep.job_id))  # SLURM ends the run itself
    job = sweep.cluster.wait_until_ended(sweep.job_id, restarts=1, timeout=600)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), sweep.log[-3000:]
    assert f"resuming {sweep.experiment}" in sweep.log
    results = sweep.experiment / "results"
    assert set(pd.read_parquet(results / "trials.parquet")["status"]) == {"completed"}
    epochs = pd.read_parquet(results / "epochs.parquet")
    assert sorted(zip(epochs["trial_id"], epochs["epoch"])) == [
        (trial, epoch) for trial in TRIALS for epoch in (1, 2, 3)
    ]
    assert not still_running(sweep.root), "processes of the job left after it ended"


def test_the_time_limit_while_the_teacher_trains_requeues_and_the_rerun_trains_it_again(sweep):
    sweep.space.write_text(TEACHER_SPACE)
    held = {"trial_0000": {"epoch": 2, **HOLD}}  # the teacher's trial, before its second epoch
    sweep.env["TUNE_KD_TEST_FAULTS"] = json.dumps(held)
    sweep.submit()
    sweep.wait_for(lambda: "trial_0000 hold 2" in sweep.faults, "the teacher's second epoch")
    sweep.signal_time_limit()
    check_completed(sweep, restarts=1, trials=TRIALS[:1], errors=("training teacher resnet14",))
    assert "resuming" not in sweep.log  # no plan was written before the teacher was ready
    assert len(list((sweep.storage / "teachers").glob("resnet14_vanilla-*/ckpt_epoch_3.pth"))) == 1
    starts = [line for line in sweep.faults if " start " in line]
    assert starts == ["trial_0000 start 0"] * 3  # the teacher, the teacher again, the student


def test_the_time_limit_in_the_first_seconds_of_a_rerun_ends_the_job(sweep):
    """A time limit within the signal's margin: each run would be requeued before it starts."""
    release_the_second_trial(sweep)
    sweep.submit()
    sweep.wait_for(lambda: "Local node IP" in sweep.log, "Ray to start")
    sweep.signal_time_limit()
    sweep.wait_for(lambda: sweep.log.count("Local node IP") == 2, "the rerun's Ray to start")
    sweep.signal_time_limit()
    job = sweep.cluster.wait_until_ended(sweep.job_id, restarts=1, timeout=300)
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "1:0"), sweep.log[-3000:]
    assert "not requeued again" in sweep.log
    assert sweep.log.count("Local node finished draining") == 2
    assert not [line for line in sweep.faults if " start " in line]
    assert not still_running(sweep.root), "processes of the job left after it ended"


# ----------------------------------------------------------------------------- stand-ins


@pytest.fixture
def allocation(inject_faults) -> Iterator[tuple[Path, dict[str, str]]]:
    """A folder for the fake nodes (short: Ray's socket paths have a length limit) and the
    environment of a job on them; every process left with the folder in its command line is
    killed at the end."""
    root = Path(tempfile.mkdtemp(prefix="tkd-slurm-", dir="/tmp"))
    env = ray_environment(None)  # the stand-in srun gives each node its folder and ports
    env.update(
        PATH=os.pathsep.join([str(ROOT / "tests" / "fake_slurm"), env["PATH"]]),
        FAKE_SLURM_ROOT=str(root),
        TUNE_KD_HEAD_ADDRESS="127.0.0.1",
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
    """The stand-in `sbatch`: the batch script in the foreground, here."""
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
    (tmp_path / "tiny.yaml").write_text(SPACE)
    storage = tmp_path / "results"
    args = ["--space", str(tmp_path / "tiny.yaml"), "--storage", str(storage), "--name", "s"]
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
    assert "1 node(s) joined" not in first
    assert first.count("Local node finished draining") == 2  # the worker's Ray, then the head's
    assert (root / "requeued").read_text() == "4242\n"
    assert not still_running(root), "Ray nodes left running after the job"
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
    assert not still_running(root), "Ray nodes left running after the job"
    plan = json.loads((experiment / "tune_kd_plan.json").read_text())
    assert plan["planned"] == 2
