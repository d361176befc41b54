"""cluster.yaml is a valid Ray cluster-launcher config (the schema shipped inside ray)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def _load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_validates_against_rays_launcher_schema() -> None:
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(_load(), json.loads(schema_path.read_text()))
    from ray.autoscaler._private.util import validate_config

    validate_config(_load())  # the launcher's own checks on top of the schema


def test_cluster_yaml_has_a_cpu_head_and_gpu_workers_from_zero() -> None:
    config = _load()
    assert config["provider"]["type"] == "aws"
    image = config["docker"]["image"]
    assert image.startswith("rayproject/ray:2.60.") and image.endswith("-gpu")
    assert image.split(":")[1].split("-")[0] == ray.__version__  # the client's Ray
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_workers = [t for name, t in types.items() if t["resources"].get("GPU", 0) > 0]
    assert gpu_workers and all(t["min_workers"] == 0 for t in gpu_workers)
    assert any("pip install" in c and "dskd_ray" in c for c in config["setup_commands"])
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
