"""The test session's GAP3D service: artifacts, a config derived from serve/config.yaml, `serve run`, readiness."""

import time
from pathlib import Path

import httpx
import torch

from gap3d.build import build_aligner
from gap3d.evaluation import generate_tokens
from gap3d.export import save_export
from gap3d.prompt_encoder import PromptEncoder
from miniature.checkpoints.trellis import write_tiny_trellis
from serve.launch import local_config

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
QUOTA_KEY = "test-quota-key-456"  # a second key, whose jobs the job-quota test fills up alone
QUOTA_AUTH = {"Authorization": f"Bearer {QUOTA_KEY}"}
KEYS_ENV = "GAP3D_TEST_API_KEYS"
# The synchronous deadline of the test service: short, so overload tests end quickly, yet long enough that a loaded
# machine still finishes one decode within it (admission refuses everything it expects to miss the deadline).
DEADLINE_S = 20.0
SEED = 5  # the seed the tests generate with; any seed decodes some structure (write_artifacts calibrates for it)
CALIBRATION_PROMPTS = ("a red cone", "a large blue cube", "a medium green sphere", "a white torus")
LEASE_S = 4.0  # a JobRunner killed mid-job is noticed after this long at the latest
MAX_ACTIVE_JOBS = 6  # queued or running jobs per key: above what the job tests keep in flight with one key
BODY_STALL_S = 8.0  # an upload stalled this long gets 408: long enough to open hundreds of stalled uploads first


def write_artifacts(root: Path, config) -> dict:
    """A random aligner export with a non-trivial velocity field and a stage-1-only tiny TRELLIS, its occupancy
    calibrated on that aligner's tokens so that what it decodes is an object's share of the grid, not empty."""
    aligner = build_aligner(config, seed=0)
    torch.nn.init.normal_(aligner.final_layer.linear.weight, std=0.05)
    save_export(root / "export", aligner.state_dict(), None, config, step=0)
    with torch.no_grad():
        cond = PromptEncoder.from_pretrained(config.vlm)(list(CALIBRATION_PROMPTS))  # (4, s, d_vlm)
    tokens = generate_tokens(aligner.eval(), cond, config.flow, seed=0)  # (4, N, D)
    # Stage 1 only keeps each generation around a second; stage 2 has its own tests in test_trellis_full.py.
    write_tiny_trellis(root / "trellis", cond_dim=config.aligner.token_dim, stage2=False, calibration_cond=tokens)
    return {"export": str(root / "export"), "trellis": str(root / "trellis")}


def service_config(port: int, artifacts: dict, broker: str, jobs_store: str) -> dict:
    """serve/config.yaml as shipped, on `port`, with the session's artifacts, broker, job store and an API key."""
    jobs = {
        "store": jobs_store,
        "broker": broker,
        "lease_s": LEASE_S,
        "sweep_every_s": 1,
        "max_active_per_key": MAX_ACTIVE_JOBS,
        "max_stored_per_key": 100,
    }
    config = local_config(
        port,
        artifacts,
        jobs=jobs,
        limits={"deadline_s": DEADLINE_S, "body_stall_s": BODY_STALL_S},
        args={"api_keys_env": KEYS_ENV, "decoder_stages": "coarse"},
    )
    gateway = next(d for d in config["applications"][0]["deployments"] if d["name"] == "GatewayDeployment")
    gateway["ray_actor_options"]["runtime_env"] = {"env_vars": {KEYS_ENV: f"{API_KEY},{QUOTA_KEY}"}}
    return config


def post(base: str, route: str, body: dict, headers: dict | None = None, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{base}{route}", json=body, headers=AUTH if headers is None else headers, timeout=timeout)


def metric(base: str, name: str, **labels) -> float:
    """The value of one sample of the Gateway's /metrics (0 when it has not been recorded yet)."""
    wanted = name + (
        "{" + ",".join(f'{key}="{value}"' for key, value in sorted(labels.items())) + "}" if labels else ""
    )
    text = httpx.get(f"{base}/metrics", headers=AUTH, timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.rsplit(" ", 1)[0] == wanted)


def replicas(deployment: str) -> dict:
    """{actor name: actor handle} of the replicas of `deployment`."""
    import ray

    return {
        actor["name"]: ray.get_actor(actor["name"], namespace="serve")
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == "serve" and f"#{deployment}#" in actor["name"]
    }


def ongoing_on(actors: dict) -> int:
    """Requests the replica actors have accepted and not finished (Serve's own count; a dead replica counts 0)."""
    import ray

    counts = []
    for actor in actors.values():
        try:
            counts.append(ray.get(actor.get_num_ongoing_requests.remote(), timeout=10))
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            counts.append(0)
    return sum(counts)


def kill(actors: dict) -> None:
    """Kill replica actors outright (as a node loss would); Serve starts new ones."""
    import ray

    for actor in actors.values():
        ray.kill(actor, no_restart=True)


def wait_for_replacement(base: str, deployment: str, killed: dict, timeout_s: float) -> None:
    """Wait until a replica of `deployment` not among `killed` exists and a /readyz snapshot taken after that is
    ready."""
    wait_for(
        lambda: set(replicas(deployment)) - set(killed), timeout_s, interval_s=0.5, what=f"a new {deployment} replica"
    )
    started = time.time()

    def ready_since_started():
        response = httpx.get(f"{base}/readyz", timeout=10)
        return response.status_code == 200 and response.json()["checked_at"] > started

    wait_for(ready_since_started, timeout_s, interval_s=0.5, what=f"the new {deployment} replica running")


def wait_for(condition, timeout_s: float, interval_s: float = 0.05, what: str = "condition"):
    """Poll `condition()` until it returns a truthy value (returned), at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"{what} did not happen within {timeout_s} s")
