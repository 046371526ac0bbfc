"""deploy/ and jobs/ray/: the files a cluster operator uses parse, have what Ray and KubeRay need,
agree with each other and with this checkout, and the RayJob's entrypoint runs here.

Nothing here launches a cloud or Kubernetes cluster (there is none on the CI machine); the real
`ray job submit` of a cm-run job runs in tests/engines/test_ray_replicas.py.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
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
    assert any(mount["mountPath"] == "/data" for mount in head["volumeMounts"])  # datasets and outputs


def test_rayjob_runs_a_replica_spec_and_its_runtime_env_parses():
    job = kuberay("RayJob", "kuberay/rayjob.yaml")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert isinstance(yaml.safe_load(job["runtimeEnvYAML"]), dict)
    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "cm-run" and argv[1].startswith(IMAGE_ROOT)
    spec = load_spec(REPO / argv[1].removeprefix(IMAGE_ROOT))
    workers = sum(group["replicas"] for group in job["rayClusterSpec"]["workerGroupSpecs"])
    assert spec.engine.kind == "vllm" and spec.engine.replicas == workers and spec.engine.num_gpus_per_replica == 1


@pytest.mark.slow
def test_the_rayjob_entrypoint_runs_here_up_to_reading_the_data(tmp_path):
    # The same command the head node runs, on this checkout instead of the image's /app: the CLI,
    # the spec and its base resolve; with no datasets in --data-dir it stops before any engine.
    argv = shlex.split(kuberay("RayJob", "kuberay/rayjob.yaml")["spec"]["entrypoint"])
    assert shutil.which(argv[0]), "cm-run is not installed"
    argv[1] = str(REPO / argv[1].removeprefix(IMAGE_ROOT))
    done = subprocess.run(
        [*argv, "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr
    assert re.search(r"massive/en-US/train\.jsonl: data file not found", done.stderr), done.stderr


def test_job_specs_for_ray_load_and_the_gpu_ones_fit_one_replica_per_gpu():
    specs = {path.name: load_spec(path) for path in sorted((REPO / "jobs/ray").glob("*.yaml"))}
    assert specs and all(spec.engine.kind == "vllm" and spec.engine.uses_ray for spec in specs.values())
    cpu = specs["massive-cpu-2replicas.yaml"].engine
    assert cpu.replicas == 2 and cpu.num_gpus_per_replica == 0 and cpu.model == "smollm2-135m-instruct"
    gpu = [spec.engine for name, spec in specs.items() if "llama3-8b" in name]
    assert gpu
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


def test_readme_commands_name_files_that_exist():
    section = (DEPLOY / "README.md").read_text()  # the cluster operations
    named = set(re.findall(r"\b((?:deploy|jobs)/[\w./-]+\.(?:yaml|Dockerfile)|deploy/Dockerfile)\b", section))
    assert named and all((REPO / path).exists() for path in named), named
