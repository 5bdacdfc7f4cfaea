"""cluster/: the `ray up` config validates, KubeRay manifests are complete, secured and runnable as written."""

import importlib
import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from ray_jobs.config import job_config_from_args
from ray_jobs.pipeline import ENCODE_SECTION
from ray_jobs.train import TRAIN_SECTIONS

REPO = Path(__file__).resolve().parent.parent
KUBERAY = REPO / "cluster" / "kuberay"
RAY_MANIFESTS = ["raycluster.yaml", "rayjob-preprocess.yaml", "rayjob-train.yaml", "rayservice.yaml"]
JOBS = ["rayjob-preprocess.yaml", "rayjob-train.yaml"]
TOKEN_SECRET = "gap3d-ray-token"
S3_SECRET = "gap3d-s3"


def load(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def cluster_spec(manifest: dict) -> dict:
    """The RayCluster spec inside any of the three kinds."""
    spec = manifest["spec"]
    return {
        "RayCluster": lambda: spec,
        "RayJob": lambda: spec["rayClusterSpec"],
        "RayService": lambda: spec["rayClusterConfig"],
    }[manifest["kind"]]()


def ray_containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [group["template"]["spec"]["containers"][0] for group in groups]


def secret_env(container: dict) -> dict[str, tuple[str, str]]:
    """env name -> (secret, key) for the variables read from Secrets."""
    return {
        item["name"]: (item["valueFrom"]["secretKeyRef"]["name"], item["valueFrom"]["secretKeyRef"]["key"])
        for item in container.get("env", [])
        if "secretKeyRef" in item.get("valueFrom", {})
    }


def plain_env(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def cpu_quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def pod_resources(group: dict) -> dict[str, float]:
    """The CPUs and GPUs Ray sees on one pod of a group (rayStartParams override the container limits)."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    params = group.get("rayStartParams", {})
    return {
        "CPU": float(params.get("num-cpus", cpu_quantity(limits["cpu"]))),
        "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
    }


def job_args(name: str):
    """(script path, parsed args) of a RayJob entrypoint, parsed by the script's own parse_args."""
    argv = shlex.split(load(name)["spec"]["entrypoint"])
    assert argv[0] == "python", f"{name}: entrypoint must start with python, got {argv[0]!r}"
    script = argv[1]
    assert (REPO / script).is_file(), f"{name}: entrypoint names {script}, which does not exist"
    module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    return script, module.parse_args(argv[2:])


def test_aws_yaml_validates_against_the_ray_cluster_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text()), schema)


def test_aws_yaml_has_head_and_gpu_node_types_within_max_workers():
    config = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: spec for name, spec in types.items() if name != config["head_node_type"]}
    assert any(spec["resources"].get("GPU", 0) >= 1 for spec in workers.values())
    for name, spec in workers.items():
        assert 0 <= spec["min_workers"] <= spec["max_workers"], name
    assert sum(spec["max_workers"] for spec in workers.values()) <= config["max_workers"]


def test_aws_yaml_installs_torch_before_the_package_and_starts_ray_with_token_auth():
    config = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    setup = config["setup_commands"]
    torch_step = next(i for i, command in enumerate(setup) if "install torch==" in command)
    package_step = next(i for i, command in enumerate(setup) if 'pip install ".[jobs,serve]"' in command)
    assert torch_step < package_step
    assert "~/.ray/auth_token" in config["file_mounts"]
    for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in command
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][1]


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_manifest_has_the_kuberay_fields(name):
    manifest = load(name)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] in ("RayCluster", "RayJob", "RayService")
    spec = cluster_spec(manifest)
    assert spec["rayVersion"] == "2.60.0"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_cluster_has_a_cpu_group_and_a_gpu_group_and_an_idle_head(name):
    spec = cluster_spec(load(name))
    gpus = [pod_resources(group)["GPU"] for group in spec["workerGroupSpecs"]]
    assert 0 in gpus and max(gpus) >= 1
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_every_ray_container_reads_the_token_and_s3_credentials_from_secrets(name):
    manifest = load(name)
    containers = ray_containers(cluster_spec(manifest))
    if manifest["kind"] == "RayJob":
        containers.append(manifest["spec"]["submitterPodTemplate"]["spec"]["containers"][0])
    for container in containers:
        assert plain_env(container)["RAY_AUTH_MODE"] == "token"
        assert secret_env(container)["RAY_AUTH_TOKEN"] == (TOKEN_SECRET, "auth_token")
    for container in ray_containers(cluster_spec(manifest)):
        env = secret_env(container)
        assert env["AWS_ACCESS_KEY_ID"][0] == env["AWS_SECRET_ACCESS_KEY"][0] == S3_SECRET


@pytest.mark.parametrize("name", RAY_MANIFESTS)
def test_dashboard_is_not_exposed_outside_the_kubernetes_cluster(name):
    spec = cluster_spec(load(name))
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert not spec["headGroupSpec"].get("enableIngress", False)
    assert spec["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}


def test_secret_example_defines_every_secret_the_manifests_read():
    defined = {
        doc["metadata"]["name"]: set(doc["stringData"])
        for doc in yaml.safe_load_all((KUBERAY / "secret-example.yaml").read_text())
    }
    for name in RAY_MANIFESTS:
        for container in ray_containers(cluster_spec(load(name))):
            for item in container["env"]:
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional", False):
                    assert ref["key"] in defined[ref["name"]], f"{name}: {ref} missing from secret-example.yaml"


def test_manifests_run_the_dockerfile_image_from_its_workdir():
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text().splitlines()
    workdir = next(line.split()[1] for line in dockerfile if line.startswith("WORKDIR"))
    images = {container["image"] for name in RAY_MANIFESTS for container in ray_containers(cluster_spec(load(name)))}
    assert len(images) == 1
    for name in JOBS:
        assert yaml.safe_load(load(name)["spec"]["runtimeEnvYAML"])["working_dir"] == workdir


@pytest.mark.parametrize("name", JOBS)
def test_job_entrypoint_is_accepted_by_the_scripts_own_parser_and_config(name):
    script, args = job_args(name)
    config, _ = job_config_from_args(args, TRAIN_SECTIONS)
    assert config.preset == "paper"
    assert config.vlm.path.startswith("s3://") and config.dino.path.startswith("s3://")


def test_preprocess_and_train_jobs_use_the_same_encoders():
    preprocess, _ = job_config_from_args(job_args("rayjob-preprocess.yaml")[1], ENCODE_SECTION)
    train, _ = job_config_from_args(job_args("rayjob-train.yaml")[1], TRAIN_SECTIONS)
    # The same checkpoints and settings; encoder_identity would fingerprint the s3:// weights, which are not here.
    assert (preprocess.vlm, preprocess.dino) == (train.vlm, train.dino)


def test_train_job_reads_the_features_the_preprocess_job_writes():
    output = job_args("rayjob-preprocess.yaml")[1].output
    train_args = job_args("rayjob-train.yaml")[1]
    assert train_args.features.startswith(output + "/") and train_args.eval_features.startswith(output + "/")


def test_training_workers_fit_the_train_job_gpu_groups():
    scaling = job_config_from_args(job_args("rayjob-train.yaml")[1], TRAIN_SECTIONS)[1]["scaling"]
    groups = [
        (pod_resources(group), group["maxReplicas"])
        for group in cluster_spec(load("rayjob-train.yaml"))["workerGroupSpecs"]
    ]
    workers_per_pod = [min(pod["GPU"], pod["CPU"] // scaling.worker_cpus) for pod, _ in groups]
    assert scaling.use_gpu
    assert sum(per_pod * replicas for per_pod, (_, replicas) in zip(workers_per_pod, groups)) >= scaling.num_workers


def test_preprocess_encoder_actors_fit_a_gpu_pod():
    encode = job_config_from_args(job_args("rayjob-preprocess.yaml")[1], ENCODE_SECTION)[1]["encode"]
    pods = [pod_resources(group) for group in cluster_spec(load("rayjob-preprocess.yaml"))["workerGroupSpecs"]]
    assert any(pod["GPU"] >= encode.num_gpus and pod["CPU"] >= encode.num_cpus for pod in pods)


def test_rayservice_serve_config_equals_serve_config_gpu():
    served = yaml.safe_load(load("rayservice.yaml")["spec"]["serveConfigV2"])
    expected = yaml.safe_load((REPO / "serve" / "config.gpu.yaml").read_text())
    assert served == expected


def test_sync_rayservice_check_passes_on_the_committed_manifest():
    result = subprocess.run(
        [sys.executable, "cluster/sync_rayservice.py", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_sync_rayservice_render_replaces_only_the_serve_config_block():
    spec = importlib.util.spec_from_file_location("sync_rayservice", REPO / "cluster" / "sync_rayservice.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    manifest = (KUBERAY / "rayservice.yaml").read_text()
    rendered = yaml.safe_load(sync.render(manifest, "applications: []\n"))
    assert yaml.safe_load(rendered["spec"]["serveConfigV2"]) == {"applications": []}
    assert rendered["spec"]["rayClusterConfig"] == load("rayservice.yaml")["spec"]["rayClusterConfig"]


def test_serve_deployments_fit_the_rayservice_worker_groups():
    spec = cluster_spec(load("rayservice.yaml"))
    groups = [(pod_resources(group), group["maxReplicas"]) for group in spec["workerGroupSpecs"]]
    deployments = yaml.safe_load(load("rayservice.yaml")["spec"]["serveConfigV2"])["applications"][0]["deployments"]
    capacity = {kind: sum(pod[kind] * replicas for pod, replicas in groups) for kind in ("CPU", "GPU")}
    needed = {"CPU": 0.0, "GPU": 0.0}
    for deployment in deployments:
        options = deployment["ray_actor_options"]
        replica = {"CPU": options.get("num_cpus", 1), "GPU": options.get("num_gpus", 0)}
        pods = [pod for pod, _ in groups if pod["CPU"] >= replica["CPU"] and pod["GPU"] >= replica["GPU"]]
        assert pods, f"no worker group pod fits one {deployment['name']} replica ({replica})"
        scaling = deployment.get("autoscaling_config", {})
        replicas = scaling.get("max_replicas", deployment.get("num_replicas", 1))
        for kind in needed:
            needed[kind] += replica[kind] * replicas
    assert needed["GPU"] <= capacity["GPU"] and needed["CPU"] <= capacity["CPU"], (needed, capacity)


def test_the_rayservice_workers_mount_the_api_keys_where_the_serve_config_reads_them_and_probe_the_service():
    key_file = Path(
        yaml.safe_load((REPO / "serve" / "config.gpu.yaml").read_text())["applications"][0]["args"]["api_keys_file"]
    )
    spec = cluster_spec(load("rayservice.yaml"))
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
        secrets = {volume["name"]: volume["secret"]["secretName"] for volume in pod["volumes"] if "secret" in volume}
        assert (
            secrets[next(name for name, path in mounts.items() if path == str(key_file.parent))] == "gap3d-api-keys"
        ), group["groupName"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    keys = {
        doc["metadata"]["name"]: doc["stringData"]
        for doc in yaml.safe_load_all((KUBERAY / "secret-example.yaml").read_text())
    }["gap3d-api-keys"]
    assert key_file.name in keys
