"""The real jobs end to end on random checkpoints: the GPU check at the paper's sizes, the same script at toy sizes
on the CPU (tests/test_gpu_check.py runs it, so it does not rot between GPU runs). One JSON line per figure, then a
one-line verdict.

    python benchmarks/gpu_check.py                       # one GPU if there is one, else the CPU at toy sizes
    python benchmarks/gpu_check.py --device cpu --pairs 32 --steps 4

1. Random checkpoints with the real classes, saved in the layouts users load: on a GPU Qwen2.5-VL-3B's config, DINOv2
   ViT-L/14 with registers and TRELLIS-image-large's release layout (miniature.checkpoints); on the CPU the tiny
   preset's sizes.
2. Preprocessing (ray_jobs/preprocess.py) of synthetic pairs at the encoder's size: the job's rows/s, and the
   encoders alone: images/s of the DINOv2 targets, prompts/s of the prompt cache.
3. Training (ray_jobs/train.py): Ray Train + DeepSpeed ZeRO-2 on one worker, bf16 on CUDA (the paper preset),
   fp32 on the CPU (the tiny preset): samples/s over the last half of the steps, peak memory, MFU on a GPU.
4. The export the training wrote: its size and load time.
5. `serve run` of a config derived from serve/config.gpu.yaml (scaled to one GPU, decoder stages "full") or
   serve/config.yaml (CPU): one /v1/generate and one async job, seconds per stage, peak memory per deployment.
"""

import argparse
import json
import logging
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from benchmarks.flops import aligner_train_flops, bf16_peak_tflops, utilisation
from cli.broker import start_redis
from cli.demo_service import generate_as_job, generate_now
from gap3d.build import derive_shapes
from gap3d.config import load_job_config
from gap3d.data.encode import FeatureEncoder
from gap3d.export import find_export_dir, load_export
from miniature.checkpoints.encoders import write_tiny_dino, write_tiny_vlm
from miniature.checkpoints.paper_widths import write_paper_width_dino, write_paper_width_vlm
from miniature.checkpoints.trellis import write_release_size_trellis, write_tiny_trellis
from miniature.shards import write_synth
from ray_jobs.preprocess import run_preprocess
from ray_jobs.train import TRAIN_SECTIONS, run_training, trained_checkpoint
from serve.launch import SHIPPED_GPU_CONFIG, free_port, local_config, serve_run

logger = logging.getLogger("gap3d.gpu_check")

# The targets at the paper's sizes on one H100/H200.
TARGET_MFU = 0.45
TARGET_FULL_GENERATION_S = 3.0
# serve/config.gpu.yaml asks 0.25 + 0.5 + 1 GPUs of its model deployments; on one GPU they share it so.
GPU_SHARES = {"PromptEncoderDeployment": 0.2, "AlignerDeployment": 0.3, "DecoderDeployment": 0.5}
CAPTION = "a small red cone on the left"
SEEDS = range(4)  # a random aligner and TRELLIS may decode an empty structure (a 422) for a seed: try the next


class Figures:
    """The figures printed so far, one JSON line each; the verdict reads the targets' back."""

    def __init__(self):
        self.lines: list[dict] = []

    def emit(self, figure: str, value, **extra) -> None:
        line = {"figure": figure, "value": value, **extra}
        self.lines.append(line)
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    def value(self, figure: str, **match):
        """The value of the first `figure` line whose fields include `match` (None if none was printed)."""
        lines = (line for line in self.lines if line["figure"] == figure)
        return next((line["value"] for line in lines if match.items() <= line.items()), None)


def synchronized(device: torch.device) -> float:
    """perf_counter once `device` has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def write_checkpoints(root: Path, device: torch.device) -> dict[str, Path]:
    """Random VLM, DINOv2 (and their config.json) at the paper's sizes on a GPU, the tiny ones on the CPU."""
    paths = {name: root / name for name in ("vlm", "dino")}
    if device.type == "cuda":
        # In bf16, as the releases ship (and half the disk and write time of float32).
        write_paper_width_vlm(paths["vlm"], device=device, dtype=torch.bfloat16)
        write_paper_width_dino(paths["dino"], device=device, dtype=torch.bfloat16)
    else:
        write_tiny_vlm(paths["vlm"])
        write_tiny_dino(paths["dino"])
    return paths


def write_trellis(root: Path, token_dim: int, device: torch.device) -> Path:
    """TRELLIS-image-large's layout and sizes on a GPU; on the CPU a tiny random stage 1."""
    if device.type == "cuda":
        return write_release_size_trellis(root / "trellis", device=device)
    return write_tiny_trellis(root / "trellis", cond_dim=token_dim, stage2=False)


def job_config(args: argparse.Namespace, checkpoints: dict[str, Path], device: torch.device):
    """The paper preset (GPU) or tiny preset (CPU) on the written encoders, one worker, ZeRO-2, `args.steps` steps;
    the metrics reported last cover the second half of the steps (the first ones compile and warm up)."""
    overrides = [
        f"vlm.path={checkpoints['vlm']}",
        f"dino.path={checkpoints['dino']}",
        f"train.max_steps={args.steps}",
        f"train.global_batch_size={args.batch}",
        f"train.checkpoint_every={args.steps}",
        f"train.log_every={max(1, args.steps // 2)}",
        "scaling.num_workers=1",
        "scaling.zero_stage=2",
    ]
    preset = "paper" if device.type == "cuda" else "tiny"
    config, sections = load_job_config(preset, None, overrides, TRAIN_SECTIONS)
    return derive_shapes(config), sections


def check_preprocessing(
    figures: Figures, config, sections: dict, workdir: Path, pairs: int, device: torch.device
) -> str:
    """The preprocessing job on `pairs` synthetic pairs, then the encoders alone; returns the features' URI."""
    raw, features = workdir / "raw", workdir / "features"
    write_synth(str(raw), num=pairs, seed=0, image_size=config.dino.image_size)
    summary = run_preprocess(config, sections["encode"], str(raw), str(features))
    figures.emit(
        "preprocess_job_rows_per_s", summary["rows_per_s"], rows=summary["rows_written"], wall_s=summary["wall_s"]
    )
    encoder = FeatureEncoder(config, device)
    batch = sections["encode"].encode_batch_size
    images = np.random.default_rng(0).integers(0, 256, (batch, *[config.dino.image_size] * 2, 3), dtype=np.uint8)
    captions = [CAPTION] * batch
    encode_prompts = (
        encoder.prompt_encoder.encode_prompt_cache if encoder.mode == "prompt_cache" else encoder.prompt_encoder
    )
    with torch.no_grad():
        for name, encode, inputs in (
            ("dino_images_per_s", encoder.dino.encode, images),
            (f"{encoder.mode}_prompts_per_s", encode_prompts, captions),
        ):
            encode(inputs)  # warm-up: kernels chosen, caches allocated
            start = synchronized(device)
            encode(inputs)
            figures.emit(name, round(batch / (synchronized(device) - start), 2), batch=batch)
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the training worker, another process, needs the memory
    return str(features)


def check_training(figures: Figures, config, sections: dict, features: str, workdir: Path, device: torch.device) -> str:
    """Ray Train + DeepSpeed on the features; returns the checkpoint's URI."""
    start = time.perf_counter()
    result = run_training(
        config, sections["scaling"], str(workdir / "runs"), features=f"{features}/train-*.parquet", name="check"
    )
    metrics = result.metrics
    zero = {"zero_stage": sections["scaling"].zero_stage, "precision": config.train.precision}
    figures.emit(
        "train_samples_per_s", round(metrics["samples_per_s"], 2), global_batch=config.train.global_batch_size, **zero
    )
    figures.emit("train_peak_memory_gib", round(metrics["peak_memory_gib"], 3), device=device.type)
    figures.emit("train_wall_s", round(time.perf_counter() - start, 1), steps=metrics["step"])
    peak = bf16_peak_tflops(device)
    if peak is not None:
        # The aligner's FLOPs alone; the frozen VLM's forward over the soft tokens is left out.
        use = utilisation(aligner_train_flops(config.aligner, 1) * metrics["samples_per_s"], 1.0, peak)
        figures.emit("train_aligner_mfu", use["mfu"], tflops=use["tflops"], bf16_peak_tflops=peak)
    return trained_checkpoint(result, str(workdir / "runs"))


def check_export(figures: Figures, checkpoint: str, workdir: Path) -> Path:
    """The export the training wrote, copied out as a user would serve it: its size and load time."""
    export = workdir / "export"
    shutil.copytree(find_export_dir(checkpoint), export)
    figures.emit("export_bytes", sum(path.stat().st_size for path in export.rglob("*") if path.is_file()))
    start = time.perf_counter()
    load_export(str(export))
    figures.emit("export_load_s", round(time.perf_counter() - start, 3))
    return export


def service_config(port: int, artifacts: dict, jobs: dict, device: torch.device) -> dict:
    """serve/config.yaml on the CPU (stage 1 only, as the random tiny release has no trained stage 2 to time); on a
    GPU serve/config.gpu.yaml scaled to one GPU and one replica each."""
    if device.type != "cuda":
        return local_config(port, artifacts, jobs=jobs, args={"decoder_stages": "coarse"})
    config = local_config(port, artifacts, jobs=jobs, args={"api_keys_file": None}, shipped=SHIPPED_GPU_CONFIG)
    config["proxy_location"] = "HeadOnly"
    for deployment in config["applications"][0]["deployments"]:
        options = deployment["ray_actor_options"]
        options["num_cpus"] = min(options["num_cpus"], 1)
        if deployment["name"] in GPU_SHARES:
            options["num_gpus"] = GPU_SHARES[deployment["name"]]
        if "autoscaling_config" in deployment:
            deployment["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    return config


def replica_peak_memory(_replica) -> dict:
    """Run inside a Serve replica (through __ray_call__): its process's peak RSS and peak CUDA allocation, GiB."""
    cuda = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_initialized() else None
    return {"rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cuda_gib": cuda}


def check_serving(figures: Figures, artifacts: dict, broker: str, workdir: Path, device: torch.device) -> None:
    """`serve run` the derived config; one asset per route, seconds per stage; peak memory per deployment."""
    from ray import serve

    config = service_config(free_port(), artifacts, {"store": str(workdir / "jobs"), "broker": broker}, device)
    start = time.perf_counter()
    base = serve_run(config, workdir / "serve_config.yaml", ray.get_runtime_context().gcs_address)
    figures.emit("serve_ready_s", round(time.perf_counter() - start, 1))
    try:
        for route, generate in (("/v1/generate", generate_now), ("/v1/jobs", generate_as_job)):
            response, seconds = generate_first_non_empty(base, generate)
            stages = {stage: round(value, 3) for stage, value in seconds.items()}
            figures.emit("serve_stage_s", stages, route=route, glb_bytes=len(response.content))
        for name, actor in serve_replicas().items():
            memory = ray.get(actor.__ray_call__.remote(replica_peak_memory), timeout=60)
            figures.emit("serve_peak_memory_gib", {k: v and round(v, 3) for k, v in memory.items()}, replica=name)
    finally:
        serve.shutdown()


def generate_first_non_empty(base: str, generate):
    """`generate` over SEEDS until one decodes a structure (random weights may decode none: 422)."""
    import httpx

    for seed in SEEDS:
        try:
            return generate(base, {"prompt": CAPTION, "seed": seed})
        except httpx.HTTPStatusError as error:
            if error.response.status_code != 422:
                raise
    raise RuntimeError(f"every seed of {list(SEEDS)} decoded an empty structure")


def serve_replicas() -> dict:
    """{replica actor name: handle} of the GAP3D application's replicas."""
    return {
        actor["name"]: ray.get_actor(actor["name"], namespace="serve")
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == "serve" and "#" in actor["name"]
    }


def verdict(figures: Figures, failed: str | None, device: torch.device) -> dict:
    """The run's one-line verdict: whether every step ran; on a GPU also the issue's targets, met or not."""
    line = {"verdict": "ok" if failed is None else "failed", "failed_step": failed}
    if device.type == "cuda":
        mfu, decode_s = figures.value("train_aligner_mfu"), figures.value("serve_stage_s", route="/v1/generate")
        decode_s = decode_s and decode_s.get("decoder")
        line["device"] = torch.cuda.get_device_name(device)
        line["mfu_target_met"] = mfu is not None and mfu >= TARGET_MFU
        line["full_generation_target_met"] = decode_s is not None and decode_s < TARGET_FULL_GENERATION_S
    return line


def run_steps(figures: Figures, args: argparse.Namespace, workdir: Path, device: torch.device, broker: str):
    """Every step in order, each on the last one's output; returns the name of the one that failed (logged), or
    None."""
    step = "checkpoints"
    try:
        start = time.perf_counter()
        checkpoints = write_checkpoints(workdir / "checkpoints", device)
        config, sections = job_config(args, checkpoints, device)
        trellis = write_trellis(workdir / "checkpoints", config.aligner.token_dim, device)
        figures.emit("checkpoints_written_s", round(time.perf_counter() - start, 1), preset=config.preset)
        step = "preprocessing"
        features = check_preprocessing(figures, config, sections, workdir, args.pairs, device)
        step = "training"
        checkpoint = check_training(figures, config, sections, features, workdir, device)
        step = "export"
        export = check_export(figures, checkpoint, workdir)
        step = "serving"
        artifacts = {"export": str(export), "trellis": str(trellis), "vlm": str(checkpoints["vlm"])}
        check_serving(figures, artifacts, broker, workdir, device)
    except Exception:
        logger.exception("the %s step failed", step)
        return step
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if cuda else "cpu")
    parser.add_argument("--pairs", type=int, default=256 if cuda else 32, help="synthetic image-caption pairs")
    parser.add_argument("--steps", type=int, default=30 if cuda else 4, help="training steps")
    parser.add_argument("--batch", type=int, default=16 if cuda else 8, help="training's global batch")
    parser.add_argument("--workdir", default=None, help="where everything is written (default: a temporary one)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    device = torch.device(args.device)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gap3d-gpu-check-")).resolve()
    broker_port = free_port()
    broker = start_redis(broker_port)
    # Workers log to their files under the session directory: stdout carries the JSON lines alone.
    ray.init(num_cpus=None if device.type == "cuda" else 4, include_dashboard=False, log_to_driver=False)
    try:
        figures = Figures()
        failed = run_steps(figures, args, workdir, device, f"redis://127.0.0.1:{broker_port}/0")
    finally:
        ray.shutdown()
        broker.terminate()
        broker.wait(timeout=10)
    sys.stdout.write(json.dumps(verdict(figures, failed, device)) + "\n")
    return 0 if failed is None else 1


if __name__ == "__main__":
    sys.exit(main())
