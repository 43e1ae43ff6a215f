"""cluster.yaml against Ray's own schema, offline, and the promises its comments make."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).parents[1] / "cluster.yaml"


def prepared() -> dict:
    config = prepare_config(yaml.safe_load(CLUSTER.read_text()))
    validate_config(config)  # raises on any schema violation
    return config


def test_cluster_yaml_is_valid_for_ray_up():
    config = prepared()
    assert config["provider"]["type"] == "aws"
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 0 and workers["max_workers"] > 0


def test_the_dashboard_listens_on_the_head_nodes_localhost_only():
    config = prepared()
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head


def test_every_node_gets_the_project_installed():
    config = prepared()
    assert config["file_mounts"] == {"~/tune-kd": "."}
    assert any("pip install -e ~/tune-kd" in c for c in config["setup_commands"])
    assert config["head_setup_commands"] == config["setup_commands"]  # nothing else on the head


# ----------------------------------------------------------------------------- Kubernetes

ROOT = CLUSTER.parent
RAYJOB = ROOT / "cluster" / "kuberay-rayjob.yaml"


def pinned_ray() -> str:
    """The one Ray version the project pins (`ray[...]==X`), which every node must run."""
    [pin] = re.findall(r'"(ray\b[^"]*)"', (ROOT / "pyproject.toml").read_text())
    match = re.fullmatch(r"ray(\[[\w,]+\])?==([\d.]+)", pin)
    assert match, f"Ray is not pinned to one version: {pin}"
    return match[2]


def manifest() -> tuple[dict, dict]:
    documents = {d["kind"]: d for d in yaml.safe_load_all(RAYJOB.read_text())}
    return documents["RayJob"], documents.get("PersistentVolumeClaim", {})


def pods(job: dict) -> list[tuple[str, dict]]:
    cluster = job["spec"]["rayClusterSpec"]
    groups = [("head", cluster["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return [(name, group["template"]["spec"]) for name, group in groups]


def test_the_rayjob_runs_the_sweep_command():
    job, _ = manifest()
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["entrypoint"].startswith("python -m tune_kd.run --address auto ")
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_the_rayjob_requests_gpus_for_its_workers_only():
    job, _ = manifest()
    for name, spec in pods(job):
        [container] = spec["containers"]
        gpus = int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
        assert gpus == 0 if name == "head" else gpus > 0, name
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_every_pod_mounts_the_storage_the_sweep_writes_to():
    job, claim = manifest()
    storage = shlex.split(job["spec"]["entrypoint"])
    storage = Path(storage[storage.index("--storage") + 1])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, spec in pods(job):
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        }
        [container] = spec["containers"]
        mounted = [m for m in container["volumeMounts"] if storage.is_relative_to(m["mountPath"])]
        assert len(mounted) == 1, f"{name} does not mount {storage}"
        assert claims[mounted[0]["name"]] == claim["metadata"]["name"], name


def test_every_cluster_definition_runs_the_ray_version_the_project_pins():
    version = pinned_ray()
    job, _ = manifest()
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == version
    for name, spec in pods(job):
        [container] = spec["containers"]
        assert container["image"].endswith(f":ray-{version}"), name
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert f"\nFROM rayproject/ray:{version}-" in dockerfile
    # cluster.yaml's nodes install the project itself, and so its pinned Ray.
    config = prepared()
    assert any("pip install -e ~/tune-kd" in c for c in config["setup_commands"])
    assert ray.__version__ == version  # and so does this machine
