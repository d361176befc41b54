"""rayjob.yaml is a valid KubeRay RayJob (the CRD's schema, kept in tests/kuberay/) that runs the
nightly scoring job as the README says."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "tests" / "kuberay" / "rayjob-v1.schema.json"


def _manifest() -> dict:
    return yaml.safe_load((REPO / "rayjob.yaml").read_text())


def unknown_fields(instance: Any, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not name. The API server prunes them without a word (a typo such
    as `entryPoint` would vanish), so the test looks for them itself."""
    if isinstance(instance, dict) and schema.get("type") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return []
        properties, extra = schema.get("properties"), schema.get("additionalProperties")
        found = []
        for key, value in instance.items():
            if properties is not None and key in properties:
                found += unknown_fields(value, properties[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(value, extra, f"{path}.{key}")
            elif properties is not None and not extra:
                found.append(f"{path}.{key}")
        return found
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        return [
            f
            for i, v in enumerate(instance)
            for f in unknown_fields(v, schema["items"], f"{path}[{i}]")
        ]
    return []


def test_rayjob_yaml_validates_against_the_kuberay_rayjob_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    assert (
        "ray.io_rayjobs.yaml" in schema["$comment"] and "ray-project/kuberay" in schema["$comment"]
    )
    manifest = _manifest()
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    jsonschema.validate(manifest, schema)
    assert unknown_fields(manifest, schema) == []
    # The checks fail on what they should: a misspelt field, a wrong type.
    typo = _manifest()
    typo["spec"]["entryPoint"] = typo["spec"].pop("entrypoint")
    assert unknown_fields(typo, schema) == [".spec.entryPoint"]
    wrong = _manifest()
    wrong["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    try:
        jsonschema.validate(wrong, schema)
    except jsonschema.ValidationError as e:
        assert "maxReplicas" in str(e.path)
    else:
        raise AssertionError("a string maxReplicas passed the schema")


def test_rayjob_yaml_runs_the_nightly_job_as_the_readme_says() -> None:
    from typer.main import get_command

    from dskd_ray.cli import app

    spec = _manifest()["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/score.py"] and (REPO / argv[1]).is_file()
    # The arguments are the real command's: parsed by it (nothing is run).
    get_command(app).commands["score"].make_context("score", argv[2:])
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "/home/ray/dskd-ray"
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__  # the Ray the project is tested with
    assert cluster["authOptions"]["mode"] == "token"  # token auth stays on, as everywhere
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    containers = [c for g in groups for c in g["template"]["spec"]["containers"]]
    assert len({c["image"] for c in containers}) == 1  # one image: driver and actors agree
    for c in containers:  # every node reads and writes S3: credentials from the Secret
        assert {"secretRef": {"name": "dskd-s3"}} in c["envFrom"], c["name"]
        assert c["resources"]["requests"] == c["resources"]["limits"]
