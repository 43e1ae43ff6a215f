"""A sweep without `--address` runs on a Ray of its own that listens on 127.0.0.1 only: never on a
cluster that a `ray start` left behind (a stale address file in Ray's temp folder) or that runs
beside it (found through that file or RAY_ADDRESS), and never on the machine's network
interfaces. Each Ray started here has a private RAY_TMPDIR; every process started with it is
killed at the end."""

from __future__ import annotations

import contextlib
import ipaddress
import os
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
import yaml

ROOT = Path(__file__).parents[1]
RAY = Path(sys.executable).parent / "ray"
# Ray's switch, on by default on macOS, that keeps its addresses on 127.0.0.1: without it, Ray
# replaces 127.0.0.1 (in `--node-ip-address`, RAY_ADDRESS, its address file) with the machine's
# network address, where a Ray started here must not listen.
SINGLE_MACHINE = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def started_with(ray_tmp: Path) -> list[psutil.Process]:
    """The processes whose environment names `ray_tmp` as RAY_TMPDIR: the Rays of this test."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.pid != os.getpid() and process.environ().get("RAY_TMPDIR") == str(ray_tmp):
                found.append(process)
    return found


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A short private RAY_TMPDIR (Ray's socket paths must stay under 108 characters)."""
    with tempfile.TemporaryDirectory(prefix="rl", dir="/tmp", ignore_cleanup_errors=True) as folder:
        try:
            yield Path(folder)
        finally:
            for process in started_with(Path(folder)):
                with contextlib.suppress(psutil.Error):
                    process.kill()


def program(process: psutil.Process) -> str:
    """What a process runs: its executable's name, or its script's for Python."""
    words = [Path(word).name for word in process.cmdline()]
    if words[0].startswith("python"):
        words = [word for word in words[1:] if not word.startswith("-")] or words
    return words[0]


def sockets_of(processes: list[psutil.Process]) -> list[tuple[int, str, str, int]]:
    """(pid, program, address, port) of every TCP socket listening and UDP socket bound by
    `processes`."""
    found = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            for c in process.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN or c.type == socket.SOCK_DGRAM:
                    found.append((process.pid, program(process), c.laddr.ip, c.laddr.port))
    return found


def on_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def space_file(tiny: dict, folder: Path) -> Path:
    """A sweep of one tiny SimKD trial."""
    path = folder / "local.yaml"
    space = {"name": "local", **tiny, "grid": {"seed": [0]}, "resources": {"cpu": 1}}
    path.write_text(yaml.safe_dump(space))
    return path


def local_sweep(tiny: dict, folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m tune_kd.run` without `--address`, in a session of its own, which is killed
    after it (with the local Ray it started)."""
    args = ["--space", str(space_file(tiny, folder)), "--storage", str(folder / "results")]
    process = subprocess.Popen(
        [sys.executable, "-m", "tune_kd.run", *args, "--name", "local"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output = process.communicate(timeout=400)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate()[0] + "\n(killed: still running after 400 s)"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, output)


def sweep_env(ray_tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "RAY_TMPDIR": str(ray_tmp)}


@pytest.mark.e2e
def test_a_local_ray_listens_on_loopback_only(ray_tmp, monkeypatch, capsys):
    """Every port a local Ray reports (GCS, raylet, object manager, dashboard, dashboard agent,
    metrics agent and export, runtime env agent), the autoscaler's and the dashboard's metrics
    ports and a worker's port listen, and every socket of its processes and the driver's is on
    127.0.0.1."""
    import ray

    from tune_kd.run import start_ray

    metrics = {"AUTOSCALER_METRIC_PORT": free_port(), "DASHBOARD_METRIC_PORT": free_port()}
    for key, port in metrics.items():  # fixed ports by default, maybe taken by another Ray
        monkeypatch.setenv(key, str(port))
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert start_ray(None)
    try:
        dashboard = capsys.readouterr().out.split("Ray dashboard: http://")[1].split()[0]
        [node] = ray.nodes()
        gcs = ray.get_runtime_context().gcs_address
        ports = {int(address.rsplit(":", 1)[1]) for address in (dashboard, gcs)}
        ports |= {port for key, port in node.items() if key.endswith("Port")} | {*metrics.values()}
        worker = ray.get(ray.remote(num_cpus=0)(lambda: os.getpid()).remote())
        processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
        deadline = time.monotonic() + 120
        while not ports | {worker} <= {
            part for pid, _, _, port in sockets_of(processes) for part in (pid, port)
        }:
            assert time.monotonic() < deadline, (
                f"{ports} not all listening: {sockets_of(processes)}"
            )
            time.sleep(1)
        found = sockets_of(processes)
    finally:
        ray.shutdown()
    assert len(ports) == 10 and dashboard.startswith("127.0.0.1:")
    assert [s for s in found if not on_loopback(s[2])] == [], found


@pytest.mark.e2e
def test_a_stale_cluster_address_file_is_not_followed(ray_tmp, tiny, tmp_path):
    """The address file of a `ray start` killed long ago, where Ray looks for the latest
    cluster, names a dead address: the sweep starts a Ray of its own and finishes."""
    address_file = ray_tmp / "ray" / "ray_current_cluster"
    address_file.parent.mkdir()
    stale = f"127.0.0.1:{free_port()}"
    address_file.write_text(stale)
    done = local_sweep(tiny, tmp_path, sweep_env(ray_tmp))
    assert done.returncode == 0, done.stdout[-3000:]
    assert "1 planned: 1 completed" in done.stdout
    assert address_file.read_text() == stale


@pytest.fixture
def other_ray(ray_tmp) -> Iterator[tuple[str, subprocess.Popen]]:
    """A Ray head another user of the machine started with `ray start`, open to anyone with the
    machine's token, on 127.0.0.1, in the Ray temp folder a sweep would look in. Yields its
    address and its `ray start` process."""
    port = free_port()
    env = {**sweep_env(ray_tmp), **SINGLE_MACHINE}
    options = ["--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"]
    options += [
        f"--{name}={free_port()}"
        for name in ("ray-client-server-port", "dashboard-agent-listen-port", "metrics-export-port")
    ]
    process = subprocess.Popen(
        [
            str(RAY),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            *options,
        ],
        env=env,
        stdout=(ray_tmp / "other.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address_file = ray_tmp / "ray" / "ray_current_cluster"
    try:
        deadline = time.monotonic() + 120
        while not address_file.exists():
            assert process.poll() is None, (ray_tmp / "other.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the other Ray never started"
            time.sleep(0.5)
        yield address_file.read_text().strip(), process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def jobs_of(address: str, env: dict[str, str]) -> str:
    """The jobs a Ray's GCS has seen, asked without joining it as a driver (which is a job)."""
    client = f"GcsClient(address={address!r})"
    ask = f"from ray._raylet import GcsClient; print({client}.get_all_job_info())"
    done = subprocess.run(
        [sys.executable, "-c", ask],
        env={**env, "RAY_AUTH_MODE": "token"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


@pytest.mark.e2e
def test_a_sweep_leaves_another_ray_on_the_machine_alone(other_ray, ray_tmp, tiny, tmp_path):
    """Another Ray runs, named by the address file in the sweep's Ray temp folder and by
    RAY_ADDRESS, reachable (as on macOS) and open to the machine's token: the sweep runs on a
    Ray of its own all the same, and the other Ray stays up without a job of the sweep's."""
    address, process = other_ray
    env = {**sweep_env(ray_tmp), **SINGLE_MACHINE, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"}
    assert jobs_of(address, env) == "{}"
    done = local_sweep(tiny, tmp_path, env)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "1 planned: 1 completed" in done.stdout
    assert process.poll() is None
    assert jobs_of(address, env) == "{}"
    assert "RAY_ADDRESS is set but a sweep joins a cluster only with --address auto" in done.stdout
    assert all(on_loopback(ip) for _, _, ip, _ in sockets_of(started_with(ray_tmp)))
    assert (ray_tmp / "ray" / "ray_current_cluster").read_text().strip() == address
