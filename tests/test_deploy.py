"""deploy/ and jobs/ray/: the files a cluster operator uses parse, have what Ray and KubeRay need,
agree with each other and with this checkout, and the RayJob's entrypoint runs here.

Nothing here launches a cloud or Kubernetes cluster (there is none on the CI machine); the real
`ray job submit` of a cm-run job runs in tests/engines/test_ray_replicas.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

from runner.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
IMAGE_ROOT = "/app/"  # where deploy/Dockerfile puts the checkout
BUCKET = "my-cm-runner-bucket"  # the placeholder the cluster specs name, to be replaced (deploy/README.md)
S3_SECRET = "cm-runner-s3"  # the Kubernetes secret whose AWS_* keys every pod gets as environment variables
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
RAY_MINOR = ".".join(ray.__version__.split(".")[:2])


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kuberay(kind: str, path: str) -> dict[str, Any]:
    (found,) = [doc for doc in documents(DEPLOY / path) if doc.get("kind") == kind]
    return found


def test_cluster_launcher_config_is_valid_for_ray_up():
    config = yaml.safe_load((DEPLOY / "ray-cluster-gpu.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    gpu_types = [name for name, node in node_types.items() if node["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(node_types[name]["max_workers"] >= 1 for name in gpu_types)
    assert config["docker"]["image"]
    assert any("ray start --head" in command for command in config["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP" in command for command in config["worker_start_ray_commands"])


def pod_specs(cluster_spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


@pytest.mark.parametrize(
    ("kind", "path", "cluster_key"),
    [("RayCluster", "kuberay/raycluster.yaml", "spec"), ("RayJob", "kuberay/rayjob.yaml", "rayClusterSpec")],
)
def test_kuberay_manifests_describe_a_gpu_cluster_of_this_ray_version(kind, path, cluster_key):
    manifest = kuberay(kind, path)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["metadata"]["name"]
    cluster = manifest["spec"] if cluster_key == "spec" else manifest["spec"][cluster_key]
    assert cluster["rayVersion"].startswith(RAY_MINOR)
    assert isinstance(cluster["headGroupSpec"]["rayStartParams"], dict)
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    images = {c["image"] for pod in pod_specs(cluster) for c in pod["containers"]}
    assert len(images) == 1  # head and workers must run the same code and Ray
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert {"name": "dashboard", "containerPort": 8265} in head["ports"]  # where jobs are submitted
    # the driver (head) and the Ray Data workers (every node) reach S3 with the secret's AWS_* variables;
    # no credential is written in the manifest, and no volume is needed: data and outputs are on S3
    for container in (c for pod in pod_specs(cluster) for c in pod["containers"]):
        assert {"secretRef": {"name": S3_SECRET}} in container["envFrom"]
        literal = {e["name"] for e in container.get("env", []) if "value" in e}
        assert not literal & set(CREDENTIALS)
        assert not any(m["mountPath"] == "/data" for m in container.get("volumeMounts", []))
    assert S3_SECRET in (DEPLOY / "README.md").read_text()


def test_rayjob_runs_a_replica_spec_and_its_runtime_env_parses():
    job = kuberay("RayJob", "kuberay/rayjob.yaml")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert isinstance(yaml.safe_load(job["runtimeEnvYAML"]), dict)
    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "cm-run" and argv[1].startswith(IMAGE_ROOT)
    spec = load_spec(REPO / argv[1].removeprefix(IMAGE_ROOT))
    workers = sum(group["replicas"] for group in job["rayClusterSpec"]["workerGroupSpecs"])
    assert spec.engine.kind == "vllm" and spec.engine.replicas == workers and spec.engine.num_gpus_per_replica == 1
    assert spec.executor.kind == "ray" and spec.output.dir.startswith(f"s3://{BUCKET}/")


@pytest.mark.slow
def test_the_rayjob_entrypoint_runs_here_up_to_reading_the_data(tmp_path, s3_bucket):
    # The same command the head node runs, on this checkout instead of the image's /app, against the
    # local S3 server holding the spec's bucket, empty: the CLI, the spec and its base resolve, the
    # output's lock is taken on S3 and released, and with no datasets there it stops before any engine.
    import boto3

    from runner._storage import ObjectPath
    from runner.checkpoint import LOCK_NAME

    s3 = boto3.client("s3", region_name=os.environ["AWS_REGION"])
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
        s3.create_bucket(Bucket=BUCKET)
    argv = shlex.split(kuberay("RayJob", "kuberay/rayjob.yaml")["spec"]["entrypoint"])
    assert shutil.which(argv[0]), "cm-run is not installed"
    argv[1] = str(REPO / argv[1].removeprefix(IMAGE_ROOT))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=os.environ)
    assert done.returncode == 2, done.stderr
    missing = rf"s3://{BUCKET}/datasets/massive/en-US/train\.jsonl: data file not found"
    assert re.search(missing, done.stderr), done.stderr
    output = ObjectPath(load_spec(argv[1]).output.dir)
    assert not (output / LOCK_NAME).is_file()


def test_job_specs_for_ray_load_and_the_gpu_ones_fit_one_replica_per_gpu():
    paths = sorted((REPO / "jobs/ray").glob("*.yaml"))
    specs = {path.name: load_spec(path) for path in paths}
    assert specs and all(spec.engine.kind == "vllm" and spec.engine.uses_ray for spec in specs.values())
    # every one on the Ray Data path, said in the spec (not left to auto)
    assert all(spec.executor.kind == "ray" and spec.runs_on_ray for spec in specs.values())
    for path in paths:  # credentials come from the environment, never from a spec's keys
        keys = json.dumps(yaml.safe_load(path.read_text()))
        assert not re.search(r"AWS_|aws_access|aws_secret|AKIA[0-9A-Z]{16}", keys, re.IGNORECASE), path
    one_machine = specs["massive-cpu-2replicas.yaml"]
    cpu = one_machine.engine
    assert cpu.replicas == 2 and cpu.num_gpus_per_replica == 0 and cpu.model == "smollm2-135m-instruct"
    # one machine: a local Ray (nothing to join) and local paths, which its workers all reach
    assert cpu.ray_address is None and one_machine.executor.ray_address is None
    places = (one_machine.user_split.path, one_machine.corpus.path, one_machine.output.dir)
    assert not any("://" in place for place in places)
    clusters = {name: spec for name, spec in specs.items() if "llama3-8b" in name}
    assert clusters
    for spec in clusters.values():  # every node reaches the data and the output: on the bucket
        for place in (spec.user_split.path, spec.corpus.path, spec.output.dir):
            assert place.startswith(f"s3://{BUCKET}/"), place
        assert spec.output.lock_lease_seconds >= 30  # a driver on a busy head renews in time
    assert BUCKET in (DEPLOY / "README.md").read_text()
    gpu = [spec.engine for spec in clusters.values()]
    for engine in gpu:
        assert engine.model == "meta-llama/Meta-Llama-3-8B-Instruct"
        assert engine.num_gpus_per_replica == engine.tensor_parallel_size == 1
        assert 0.8 <= engine.gpu_memory_utilization <= 0.95 and engine.max_model_len


def test_dockerfile_copies_what_exists_and_matches_the_ray_version():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=rayproject/ray:(\S+)$", dockerfile, re.MULTILINE)
    assert base and base.group(1).startswith(RAY_MINOR)
    copied = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, re.MULTILINE)
    sources = [source for line in copied for source in line.split()]
    assert sources and all((REPO / source).exists() for source in sources)
    assert "cm-run prepare-model" in dockerfile
    install = re.search(r'pip install --no-cache-dir "\.\[([^\]]+)\]"', dockerfile)
    assert install and "s3" in install.group(1).split(",")  # boto3, for the specs' s3:// paths
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dependency.startswith("boto3") for dependency in extras["s3"])


def test_readme_commands_name_files_that_exist():
    section = (DEPLOY / "README.md").read_text()  # the cluster operations
    named = set(re.findall(r"\b((?:deploy|jobs)/[\w./-]+\.(?:yaml|Dockerfile)|deploy/Dockerfile)\b", section))
    assert named and all((REPO / path).exists() for path in named), named
