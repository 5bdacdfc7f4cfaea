"""The embedded default: the whole GAP3D mission on one machine with the tiny preset.

synthetic shards -> Ray Data preprocessing -> Ray Train + DeepSpeed (2 workers) -> evaluation against an
untrained aligner -> `serve run serve/config.yaml` -> one HTTP generation per example prompt -> GLB files.
Run as `python -m ray_jobs demo [--workdir DIR]`. Artifacts land where serve/config.yaml expects them by
default (~/.cache/gap3d/demo), so `serve run serve/config.yaml` works afterwards.
"""

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import ray
import yaml

from gap3d import storage
from gap3d.data.synth import write_synth
from gap3d.export import find_export_dir
from gap3d.tiny.trellis import write_tiny_trellis
from ray_jobs.config import add_config_arguments, configure_logging, job_config_from_args
from ray_jobs.evaluate import evaluate
from ray_jobs.preprocess import run_preprocess
from ray_jobs.train import TRAIN_SECTIONS, run_training

logger = logging.getLogger("gap3d.demo")

EXAMPLE_PROMPTS = ("a small red cone on the left", "a large blue cube in the center", "a medium yellow torus on the right")
SERVE_CONFIG = Path(__file__).resolve().parent.parent / "serve" / "config.yaml"


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


def start_service(workdir: Path, port: int) -> str:
    """`serve run` the shipped config against this cluster with the demo's artifacts; returns the base URL."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config["applications"][0]["args"].update(export=str(workdir / "export"), trellis=str(workdir / "trellis"))
    path = workdir / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    address = ray.get_runtime_context().gcs_address
    subprocess.run(["serve", "run", str(path), "--address", address, "--non-blocking"], check=True, timeout=600)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                return base
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"the service at {base} did not become healthy within 600 s")


def run_demo(args: argparse.Namespace) -> dict:
    """Run every stage; returns the final summary."""
    config, sections = job_config_from_args(args, TRAIN_SECTIONS)
    workdir = Path(args.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    raw, features = workdir / "raw", workdir / "features"
    timings: dict = {}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)  # workers log training progress
    try:
        with stage("synthetic data", timings):
            synth = write_synth(str(raw), num=args.num_samples, seed=args.seed)
        with stage("preprocessing (Ray Data)", timings):
            preprocess = run_preprocess(config, sections["encode"], str(raw), str(features))
        with stage("training (Ray Train + DeepSpeed)", timings):
            result = run_training(config, sections["scaling"], str(workdir / "checkpoints"), features=str(features / "train-*.parquet"),
                                  eval_features=str(features / "eval-*.parquet"), name="demo", max_failures=1)
            checkpoint = result.checkpoint.path
            shutil.rmtree(workdir / "export", ignore_errors=True)
            shutil.copytree(find_export_dir(checkpoint), workdir / "export")
        with stage("evaluation on held-out attribute pairs", timings):
            metrics = evaluate(str(workdir / "export"), str(features / "eval-*.parquet"), limit=config.train.eval_samples)
            logger.info("trained %s", json.dumps(metrics["trained"]))
            logger.info("untrained %s", json.dumps(metrics["untrained"]))
            logger.info("mean target (prompt-blind reference) %s", json.dumps(metrics["mean_target"]))
        with stage("serving (Ray Serve) and HTTP generation", timings):
            if not (workdir / "trellis" / "pipeline.json").is_file():
                write_tiny_trellis(workdir / "trellis", cond_dim=config.aligner.token_dim)
            base = start_service(workdir, args.port)
            assets = []
            for index, prompt in enumerate(EXAMPLE_PROMPTS):
                response = httpx.post(f"{base}/v1/generate", json={"prompt": prompt, "seed": index}, timeout=600)
                response.raise_for_status()
                path = workdir / "assets" / f"{index}_{prompt.replace(' ', '_')}.glb"
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(response.content)
                assets.append({"prompt": prompt, "path": str(path), "bytes": len(response.content),
                               "timings_ms": {k: v for k, v in response.headers.items() if k.startswith("x-timing")}})
                logger.info("wrote %s (%d bytes)", path, len(response.content))
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    return {
        "workdir": str(workdir),
        "samples": synth.get("counts", synth.get("num")),
        "preprocess": {k: preprocess[k] for k in ("rows_in", "rows_written", "skipped") if k in preprocess},
        "checkpoint": checkpoint,
        "alignment": {name: metrics[name] for name in ("trained", "untrained", "mean_target")},
        "assets": assets,
        "seconds": timings,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(storage.cache_root() / "demo"), help="where data, checkpoints and GLB files go (serve/config.yaml's default)")
    parser.add_argument("--num-samples", type=int, default=320, help="synthetic image-caption pairs (train + eval)")
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
