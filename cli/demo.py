"""The embedded default: the whole GAP3D mission on one machine with the tiny preset.

synthetic world -> Ray Data preprocessing -> Ray Train + DeepSpeed (2 workers, held-out evals along the way)
-> evaluation on held-out shape x colour pairs against an untrained aligner and the prompt-blind mean, and of
the 3D structures the tiny TRELLIS (tiny://trellis, stage 1 trained on the same world, built once per machine)
decodes from true and from generated tokens -> pictures (alignment.png, learning_curve.png) -> `serve run
serve/config.yaml` (with a Redis broker for async jobs) -> one HTTP generation per example prompt, the last one as
an async job -> GLB files -> assets.png. Run as
`python -m cli demo [--workdir DIR]`. Artifacts land where serve/config.yaml expects them by default
(~/.cache/gap3d/demo), so `serve run serve/config.yaml` works afterwards.
"""

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import httpx
import ray

from cli.broker import start_redis
from gap3d import storage
from gap3d.build import derive_shapes
from gap3d.export import find_export_dir
from gap3d.features.store import load_rows
from gap3d.trellis.mesh_export import load_mesh
from miniature.checkpoints import tiny_checkpoint
from miniature.pictures import alignment_figure, assets_figure, fit_pca, learning_curve_figure
from miniature.shards import write_synth
from miniature.world import ATTRIBUTES, render_in_scene, render_scene, sample_scene
from ray_jobs.config import add_config_arguments, configure_logging, job_config_from_args
from ray_jobs.evaluate import Evaluation, run_evaluation
from ray_jobs.preprocess import run_preprocess
from ray_jobs.train import TRAIN_SECTIONS, run_training, trained_checkpoint
from ray_jobs.train_worker import EVALS_NAME
from serve.api import stage_timings
from serve.launch import free_port, local_config, serve_run

logger = logging.getLogger("gap3d.demo")

# Held-out combinations: no training image showed a yellow cube, a green sphere or a red torus.
EXAMPLE_PROMPTS = ("a yellow cube", "a green sphere", "a red torus")
PICTURE_ROWS = 8  # held-out prompts drawn in alignment.png


def stage(name: str, timings: dict):
    """Context manager that logs a stage and records its wall time."""

    class _Stage:
        def __enter__(self):
            logger.info("== %s", name)
            self.start = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = round(time.perf_counter() - self.start, 1)
            logger.info("== %s done in %.1f s", name, timings[name])

    return _Stage()


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


def run_demo(args: argparse.Namespace) -> dict:
    """Run every stage; returns the final summary."""
    config, sections = job_config_from_args(args, TRAIN_SECTIONS)
    config = derive_shapes(config)
    workdir = Path(args.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    raw, features = workdir / "raw", workdir / "features"
    timings: dict = {}
    broker = None
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)  # workers log training progress
    try:
        with stage("synthetic data", timings):
            # Rendered at the encoder's input size: real shards come larger and get resized, but here that only costs
            # time.
            synth = write_synth(str(raw), num=args.num_samples, seed=args.seed, image_size=config.dino.image_size)
        with stage("preprocessing (Ray Data)", timings):
            preprocess = run_preprocess(config, sections["encode"], str(raw), str(features))
        with stage("training (Ray Train + DeepSpeed)", timings):
            result = run_training(
                config,
                sections["scaling"],
                str(workdir / "checkpoints"),
                features=str(features / "train-*.parquet"),
                eval_features=str(features / "eval-*.parquet"),
                name="demo",
                max_failures=1,
                attributes=str(raw / "synth.json"),
            )
            checkpoint = trained_checkpoint(result, str(workdir / "checkpoints"))
            shutil.rmtree(workdir / "export", ignore_errors=True)
            shutil.copytree(find_export_dir(checkpoint), workdir / "export")
        with stage("tiny TRELLIS stage 1 (trained once per machine, then cached)", timings):
            shutil.rmtree(workdir / "trellis", ignore_errors=True)
            shutil.copytree(tiny_checkpoint("trellis"), workdir / "trellis")
        with stage("evaluation on held-out attribute pairs", timings):
            evaluation = run_evaluation(
                str(workdir / "export"),
                str(features / "eval-*.parquet"),
                train_features=str(features / "train-*.parquet"),
                trellis=str(workdir / "trellis"),
                shards=str(raw / "eval-*.tar"),
                attributes=str(raw / "synth.json"),
            )
            metrics = evaluation.report
            for name in ("trained", "untrained", "mean_target"):
                logger.info("%s %s", name, json.dumps({k: round(v, 3) for k, v in metrics[name].items()}))
            logger.info("3D structure %s", json.dumps(metrics["structure"]))
            log_table(metrics["table"], evaluation.eval_set.captions, evaluation.eval_set.keys, args.seed)
        with stage("pictures", timings):
            pictures = draw_pictures(
                config, evaluation, str(features / "train-*.parquet"), checkpoint, workdir, args.seed
            )
        with stage("serving (Ray Serve) and HTTP generation", timings):
            broker_port = free_port()
            broker = start_redis(broker_port)
            base = start_service(workdir, args.port, f"redis://127.0.0.1:{broker_port}/0")
            assets = []
            for index, prompt in enumerate(EXAMPLE_PROMPTS):
                body = {"prompt": prompt, "seed": index}
                # The last prompt goes through the async job route (JobRunner, Redis, job store), the others
                # synchronously.
                as_job = index == len(EXAMPLE_PROMPTS) - 1
                response, seconds = generate_as_job(base, body) if as_job else generate_now(base, body)
                path = workdir / "assets" / f"{index}_{prompt.replace(' ', '_')}.glb"
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(response.content)
                assets.append(
                    {
                        "prompt": prompt,
                        "route": "/v1/jobs" if as_job else "/v1/generate",
                        "path": str(path),
                        "bytes": len(response.content),
                        "stage_ms": {stage: round(value * 1000, 1) for stage, value in seconds.items()},
                    }
                )
                logger.info("wrote %s (%d bytes)", path, len(response.content))
            pictures["assets"] = str(
                draw_assets(config, assets, evaluation.eval_set.keys, args.seed, workdir / "assets.png")
            )
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        if broker is not None:
            broker.terminate()
    return {
        "workdir": str(workdir),
        "samples": synth.get("counts", synth.get("num")),
        "preprocess": {k: preprocess[k] for k in ("rows_in", "rows_written", "skipped") if k in preprocess},
        "checkpoint": checkpoint,
        "alignment": {name: metrics[name] for name in ("trained", "untrained", "mean_target")},
        "structure": metrics["structure"],
        "chance": chance_levels(metrics["samples"]),
        "pictures": pictures,
        "assets": assets,
        "seconds": timings,
    }


def chance_levels(rows: int) -> dict[str, float]:
    """What a prompt-blind generator scores on the held-out metrics."""
    return {
        "eval_centred_recall@5": min(1.0, 5 / rows),
        "eval_prompt_cosine_mean": 0.0,
        **{f"eval_{name}_accuracy": 1 / len(values) for name, values in ATTRIBUTES.items()},
    }


def log_table(table: list[dict], captions: list[str], keys: list[str], seed: int) -> None:
    """One held-out prompt per shape x colour pair: the caption its tokens retrieve and the attributes the probe
    reads."""
    logger.info("%-26s %-26s %s", "held-out caption", "retrieved caption", "predicted attributes")
    for row in first_row_per_pair(keys, seed):
        logger.info(
            "%-26s %-26s %s", captions[row], table[row]["retrieved"], " ".join(table[row]["predicted"].values())
        )


def first_row_per_pair(keys: list[str], seed: int) -> list[int]:
    """Indices of the first eval row of each shape x colour pair, in row order."""
    chosen, seen = [], set()
    for row, key in enumerate(keys):
        scene = sample_scene(seed, int(key))
        if (scene.shape, scene.color) not in seen:
            seen.add((scene.shape, scene.color))
            chosen.append(row)
    return chosen


def draw_pictures(
    config, evaluation: Evaluation, train_features: str, checkpoint: str, workdir: Path, seed: int
) -> dict:
    """alignment.png (renders, true and generated tokens as PCA-RGB) and learning_curve.png (periodic evals)."""
    eval_set, special = evaluation.eval_set, config.aligner.num_special_tokens
    train_targets = load_rows(train_features, config, limit=256)[0].dino
    basis = fit_pca(train_targets[:, special:].reshape(-1, train_targets.shape[-1]))
    chosen = first_row_per_pair(eval_set.keys, seed)
    rows = [
        {
            "caption": eval_set.captions[row],
            "retrieved": evaluation.report["table"][row]["retrieved"],
            "image": render_scene(sample_scene(seed, int(eval_set.keys[row])), config.dino.image_size),
            "target": eval_set.batch.dino[row],
            "generated": evaluation.generated[row],
        }
        for row in chosen[:PICTURE_ROWS]
    ]
    alignment = alignment_figure(rows, basis, config.aligner.grid_size, special, workdir / "alignment.png")
    fs, root = storage.filesystem(checkpoint)
    history = json.loads(fs.cat_file(storage.join(root, EVALS_NAME)))
    curve = learning_curve_figure(history, chance_levels(len(eval_set.captions)), workdir / "learning_curve.png")
    logger.info("wrote %s and %s", alignment, curve)
    return {"alignment": str(alignment), "learning_curve": str(curve), "history": history}


def draw_assets(config, assets: list[dict], keys: list[str], seed: int, path: Path) -> Path:
    """assets.png: per example prompt, the render of the first held-out object it describes beside a render of
    the GLB that came back over HTTP, seen from that object's camera (grey: stage 1 carries no colour)."""
    scenes = [sample_scene(seed, int(key)) for key in keys]
    rows = []
    for asset in assets:
        scene = next(s for s in scenes if f"{s.color} {s.shape}" in asset["prompt"])
        mesh = load_mesh(Path(asset["path"]).read_bytes())
        image = render_in_scene(mesh.vertices, mesh.faces, scene, 2 * config.dino.image_size, (0.7, 0.7, 0.7))
        rows.append(
            {"prompt": asset["prompt"], "truth": render_scene(scene, 2 * config.dino.image_size), "asset": image}
        )
    return assets_figure(rows, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir",
        default=str(storage.cache_root() / "demo"),
        help="where data, checkpoints and GLB files go (serve/config.yaml's default)",
    )
    parser.add_argument("--num-samples", type=int, default=1000, help="synthetic image-caption pairs (train + eval)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the demo's Serve proxy on 127.0.0.1")
    add_config_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    summary = run_demo(parse_args(argv))
    sys.stdout.write(json.dumps(summary, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
