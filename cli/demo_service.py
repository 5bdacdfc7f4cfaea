"""The demo's service part: `serve run` the shipped config on its artifacts, generate the held-out prompts over HTTP
(the synchronous route, and the async job route for one of them), and score what came back."""

import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import ray
import torch

from gap3d.data.occupancy import downsample, read_occupancy
from gap3d.evaluation import EvalSet
from gap3d.metrics import class_report
from gap3d.trellis.mesh_export import load_mesh
from miniature.scoring import dominant_color, mesh_structure, served_asset_report
from miniature.world import COLORS
from serve.api import stage_timings
from serve.launch import local_config, serve_run

logger = logging.getLogger("gap3d.demo")


@dataclass
class ServedAsset:
    """One held-out prompt's generation over HTTP."""

    row: int  # the held-out row whose caption was the prompt
    prompt: str
    route: str  # "/v1/generate" or "/v1/jobs"
    path: Path  # the GLB as received
    tokens: np.ndarray  # (N, D) the aligned tokens the service made for the same prompt and seed (/v1/embed)
    stage_ms: dict[str, float]

    def summary(self) -> dict:
        return {
            "prompt": self.prompt,
            "route": self.route,
            "path": str(self.path),
            "bytes": self.path.stat().st_size,
            "stage_ms": self.stage_ms,
        }


def start_service(workdir: Path, port: int, broker: str) -> str:
    """`serve run` the shipped config against this cluster with the demo's artifacts and broker; returns the base
    URL."""
    artifacts = {"export": str(workdir / "export"), "trellis": str(workdir / "trellis")}
    config = local_config(port, artifacts, jobs={"store": str(workdir / "jobs"), "broker": broker})
    return serve_run(config, workdir / "serve_config.yaml", ray.get_runtime_context().gcs_address)


def generate_as_job(base: str, body: dict, timeout_s: float = 600) -> tuple[httpx.Response, dict[str, float]]:
    """The async route: POST /v1/jobs, poll until the job ends, then fetch its result -> (result, seconds per stage)."""
    job_id = httpx.post(f"{base}/v1/jobs", json=body, timeout=60).raise_for_status().json()["id"]
    deadline = time.monotonic() + timeout_s
    while (state := httpx.get(f"{base}/v1/jobs/{job_id}", timeout=60).json())["status"] in ("queued", "running"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {state['status']} after {timeout_s} s")
        time.sleep(0.5)
    if state["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} {state['status']}: {state['error']}")
    return httpx.get(f"{base}/v1/jobs/{job_id}/result", timeout=60).raise_for_status(), state["timings"]


def generate_now(base: str, body: dict) -> tuple[httpx.Response, dict[str, float]]:
    """The synchronous route: POST /v1/generate -> (asset, seconds per stage from its X-Timing-<stage>-ms headers)."""
    response = httpx.post(f"{base}/v1/generate", json=body, timeout=600).raise_for_status()
    return response, stage_timings(response.headers)


def embed(base: str, body: dict) -> np.ndarray:
    """POST /v1/embed: the aligned DINOv2 tokens (N, D) the service makes for a prompt and seed."""
    response = httpx.post(f"{base}/v1/embed", json=body, timeout=600).raise_for_status()
    return np.load(io.BytesIO(response.content))


def generate_held_out(
    base: str, eval_set: EvalSet, rows: list[int], out_dir: Path, concurrency: int = 1
) -> list[ServedAsset]:
    """One asset per held-out row's caption (seed = the row), `concurrency` requests in flight at a time (the
    Decoder deployment scales out to meet them), the last row through the async job route."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(concurrency) as pool:
        served = list(pool.map(lambda row: generate_one(base, eval_set, row, out_dir, as_job=False), rows[:-1]))
    served += [generate_one(base, eval_set, row, out_dir, as_job=True) for row in rows[-1:]]
    logger.info("received %d assets over HTTP in %s", len(served), out_dir)
    return served


def generate_one(base: str, eval_set: EvalSet, row: int, out_dir: Path, as_job: bool) -> ServedAsset:
    """Row `row`'s caption generated over HTTP (seed = the row), its GLB written under `out_dir`."""
    body = {"prompt": eval_set.captions[row], "seed": row}
    response, seconds = generate_as_job(base, body) if as_job else generate_now(base, body)
    path = out_dir / f"{row:04d}_{body['prompt'].replace(' ', '_')}.glb"
    path.write_bytes(response.content)
    stage_ms = {stage: round(value * 1000, 1) for stage, value in seconds.items()}
    route = "/v1/jobs" if as_job else "/v1/generate"
    return ServedAsset(row, body["prompt"], route, path, embed(base, body), stage_ms)


def score_served(served: list[ServedAsset], eval_set: EvalSet, shards: str, resolution: int) -> dict:
    """Per shape and per colour, what the service returned for the held-out prompts: the shape of each asset (its
    nearest true grid among the held-out objects), its IoU with the best-matching true object of the prompted shape,
    its colour (the dominant vertex colour's nearest palette colour, "none" for a coarse asset), and the colour and
    shape the attribute probe reads from the service's tokens."""
    grids = read_occupancy(shards, set(eval_set.keys))
    references = torch.from_numpy(np.stack([downsample(grids[key], resolution) for key in eval_set.keys]))
    meshes = [load_mesh(asset.path.read_bytes()) for asset in served]
    structures = torch.stack([mesh_structure(mesh, resolution) for mesh in meshes])
    labels = {name: [values[asset.row] for asset in served] for name, values in eval_set.labels.items()}
    report = served_asset_report(structures, labels["shape"], references, eval_set.labels["shape"])
    report["color"] = class_report(labels["color"], [dominant_color(mesh, COLORS) or "none" for mesh in meshes])
    tokens = torch.from_numpy(np.stack([asset.tokens for asset in served]))
    report["tokens"] = eval_set.probe.report(tokens, labels)
    report["assets"] = len(served)
    return report
