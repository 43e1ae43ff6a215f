"""A private one-node SLURM for tests: Debian's `slurm-wlm` and `munge` (`.ci/run` installs them)
run as a `munged`, a `slurmctld` and a `slurmd` of their own, each started here in the
foreground and stopped by its pid. Everything lives in one folder: the `slurm.conf` that
SLURM_CONF names, a munge key and socket, state, spool and logs. The daemons listen on
127.0.0.1 only, on free ports; /etc/slurm and /etc/munge are not touched. Read a job's state,
exit code and restarts with `Cluster.job` (`scontrol show job`: there is no accounting
database)."""

from __future__ import annotations

import contextlib
import getpass
import os
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def missing_daemons() -> list[str]:
    """The daemons a private SLURM needs that are not installed here."""
    path = os.pathsep.join([os.environ["PATH"], "/usr/sbin", "/sbin"])
    return [d for d in DAEMONS if not shutil.which(d, path=path)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path, user: str) -> str:
    """One node (this machine, by its short name, at 127.0.0.1) with all its CPUs, one partition;
    a requeued job reruns within seconds (10 s credentials, a scheduler pass every 2 s)."""
    node = socket.gethostname().split(".")[0]
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return f"""\
ClusterName=tunekd
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SchedulerParameters=sched_interval=2
MpiDefault=none
MailProg=/bin/true
NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory_mb * 9 // 10}
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    """A running private SLURM: its folder and the environment its client commands need."""

    root: Path
    env: dict[str, str]  # this environment with SLURM_CONF naming the cluster's slurm.conf

    def command(self, *args: str) -> str:
        """Run a SLURM client command against this cluster; its output."""
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"{shlex.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def submit(self, *args: str, cwd: Path, env: Mapping[str, str]) -> int:
        """`sbatch ARGS` from `cwd` with `env` (and this cluster's SLURM_CONF); the job's id."""
        done = subprocess.run(
            ["sbatch", "--parsable", *args],
            cwd=cwd,
            env={**env, "SLURM_CONF": self.env["SLURM_CONF"]},
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode:
            raise RuntimeError(f"sbatch refused the job: {done.stderr.strip()}")
        return int(done.stdout.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job`'s fields: JobState, ExitCode, Restarts, ... (a run's
        DerivedExitCode is in the job completion log, `root/log/jobcomp.txt`)."""
        line = self.command("scontrol", "show", "job", "--oneliner", str(job_id))
        return dict(part.split("=", 1) for part in line.split() if "=" in part)

    def wait_until_ended(self, job_id: int, restarts: int, timeout: float) -> dict[str, str]:
        """The job's fields once its run number `restarts` (0: the first) has ended."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["JobState"] in ENDED and int(job["Restarts"]) >= restarts:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['JobState']} after {timeout:.0f} s")
            time.sleep(1)


def start(args: list[str], log: Path, env: Mapping[str, str]) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def private_slurm(root: Path) -> Iterator[Cluster]:
    """A one-node SLURM with its files under `root` (short: munge's socket path is limited), up
    and idle; its jobs are cancelled and its daemons stopped at the end."""
    for folder in ("munge", "state", "spool", "log"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for folder in (root, root / "munge"):
        folder.chmod(0o711)  # munged wants the folders of its socket searchable by all
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o400)
    (root / "slurm.conf").write_text(slurm_conf(root, getpass.getuser()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_CONF=str(root / "slurm.conf"))
    env["PATH"] = os.pathsep.join([env["PATH"], "/usr/sbin", "/sbin"])
    cluster = Cluster(root, env)
    munge = root / "munge"
    daemons = []
    try:
        daemons.append(
            start(
                [
                    "munged",
                    "--foreground",
                    f"--key-file={munge / 'munge.key'}",
                    f"--socket={munge / 'munge.socket'}",
                    f"--pid-file={munge / 'munged.pid'}",
                    f"--log-file={munge / 'munged.log'}",
                    f"--seed-file={munge / 'munged.seed'}",
                ],
                root / "log" / "munged.out",
                env,
            )
        )
        wait_for(lambda: (munge / "munge.socket").exists(), "munged", root, daemons)
        daemons.append(start(["slurmctld", "-D", "-i"], root / "log" / "slurmctld.out", env))
        daemons.append(start(["slurmd", "-D"], root / "log" / "slurmd.out", env))
        wait_for(lambda: node_idle(cluster), "the node to join slurmctld", root, daemons)
        yield cluster
    finally:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            cluster.command("scancel", "--full", f"--user={getpass.getuser()}")
            wait_for(lambda: not cluster.command("squeue", "--noheader"), "jobs to end", root, [])
        for daemon in reversed(daemons):
            stop(daemon)


def node_idle(cluster: Cluster) -> bool:
    try:
        return cluster.command("sinfo", "--noheader", "--format=%T").strip() == "idle"
    except RuntimeError:
        return False


def wait_for(condition, what: str, root: Path, daemons: list[subprocess.Popen]) -> None:
    """Wait up to a minute for `condition`; fail at once, with the logs, if a daemon ended."""
    deadline = time.monotonic() + 60
    while not condition():
        ended = [d.args[0] for d in daemons if d.poll() is not None]
        if ended or time.monotonic() > deadline:
            logs = {p.name: p.read_text()[-2000:] for p in (root / "log").glob("*")}
            problem = f"{', '.join(ended)} ended" if ended else "timed out"
            raise RuntimeError(f"{problem} waiting for {what}; logs: {logs}")
        time.sleep(0.5)
