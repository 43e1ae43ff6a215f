"""cluster.yaml against Ray's own schema, offline, and the promises its comments make."""

from __future__ import annotations

from pathlib import Path

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
