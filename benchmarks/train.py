"""Training throughput: samples/s with 1 and 2 Ray Train workers, DeepSpeed against plain DDP, one JSON line per figure.

    python benchmarks/train.py [--preset tiny] [--steps 12] [--warmup 3] [key=value ...]

Every worker runs the real training step (soft tokens through the frozen VLM on prompt caches, flow-matching
loss, backward, optimiser step) on in-memory batches, so the figures measure the step and its gradient
all-reduce, not data loading. Each configuration reports the median over timed steps of rank 0's
samples/s (all workers' samples). Ratios come from the same run. With a GPU, it also times the paper-preset
aligner step in bf16 and reports achieved TFLOP/s against the bf16 peak given by --peak-tflops.
"""

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gap3d.build import build_aligner
from gap3d.config import Gap3DConfig, load_config
from gap3d.features.format import FeatureBatch
from gap3d.prompt_encoder import PromptEncoder
from gap3d.training import AlignerTrainModule, trainable_parameters
from ray_jobs.config import add_config_arguments, job_config_from_args
from ray_jobs.train import TRAIN_SECTIONS

CAPTIONS = ("a small red cone on the left", "a large blue cube in the center", "a medium green sphere on the right", "a white torus in the middle")


def synthetic_batch(config: Gap3DConfig, prompt_encoder: PromptEncoder, size: int) -> FeatureBatch:
    """Prompt caches of real captions and layer-normed random targets (B, N, D)."""
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(size)]
    dino = torch.nn.functional.layer_norm(torch.randn(size, config.aligner.num_tokens, config.aligner.token_dim), (config.aligner.token_dim,))
    return FeatureBatch(dino=dino, caches=prompt_encoder.encode_prompt_cache(captions))


def benchmark_worker(loop_config: dict) -> None:
    """Time `steps` optimiser steps after `warmup` with DeepSpeed or DDP; rank 0 reports the median samples/s."""
    import ray.train
    import ray.train.torch

    from ray_jobs.parallelize import build_engine

    config, scaling = loop_config["config"], loop_config["scaling"]
    backend, steps, warmup = loop_config["backend"], loop_config["steps"], loop_config["warmup"]
    world = ray.train.get_context().get_world_size()
    micro_batch = config.train.global_batch_size // world
    prompt_encoder = PromptEncoder.from_pretrained(config.vlm)
    module = AlignerTrainModule(build_aligner(config, seed=0), config.flow, prompt_encoder)
    batch = synthetic_batch(config, prompt_encoder, micro_batch)
    generator = torch.Generator().manual_seed(0)
    if backend == "deepspeed":
        engine, _ = build_engine(module, config, scaling, micro_batch)

        def step():
            engine.backward(engine(batch, generator)["loss"])
            engine.step()
    else:
        model = ray.train.torch.prepare_model(module, move_to_device=False)
        optimizer = torch.optim.AdamW(trainable_parameters(module).values(), lr=config.train.lr)

        def step():
            optimizer.zero_grad()
            model(batch, generator)["loss"].backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), config.train.grad_clip)
            optimizer.step()

    rates = []
    for index in range(warmup + steps):
        start = time.perf_counter()
        step()
        if index >= warmup:
            rates.append(micro_batch * world / (time.perf_counter() - start))
    # Ray Train V2 keeps the metrics of checkpointed reports only, so the figure travels with a (tiny) checkpoint.
    directory = tempfile.mkdtemp()
    Path(directory, "rate.json").write_text(json.dumps(statistics.median(rates)))
    ray.train.report({"samples_per_s": statistics.median(rates)}, checkpoint=ray.train.Checkpoint.from_directory(directory))


def measure(config: Gap3DConfig, scaling, backend: str, workers: int, steps: int, warmup: int) -> float:
    """Median samples/s of one configuration."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        benchmark_worker,
        train_loop_config={"config": config, "scaling": scaling, "backend": backend, "steps": steps, "warmup": warmup},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": scaling.worker_cpus}),
        run_config=RunConfig(name=f"bench-{backend}-{workers}-{time.time_ns()}", storage_path="/tmp/gap3d-bench"),
    )
    return trainer.fit().metrics["samples_per_s"]


def gpu_figures(peak_tflops: float, steps: int, warmup: int) -> list[dict]:
    """Paper-preset aligner forward+backward+AdamW in bf16 on one GPU: samples/s and achieved TFLOP/s."""
    config = load_config("paper")
    aligner = build_aligner(config, seed=0).cuda().to(torch.bfloat16)
    optimizer = torch.optim.AdamW(aligner.parameters(), lr=1e-4)
    batch = 8
    x = torch.randn(batch, config.aligner.num_tokens, config.aligner.token_dim, device="cuda", dtype=torch.bfloat16)
    cond = torch.randn(batch, config.aligner.num_cond_tokens, config.aligner.cond_dim, device="cuda", dtype=torch.bfloat16)
    t = torch.rand(batch, device="cuda")
    params = sum(p.numel() for p in aligner.parameters())
    n, s, hidden, depth = config.aligner.num_tokens, config.aligner.num_cond_tokens, config.aligner.hidden_size, config.aligner.depth
    # 6 FLOPs per parameter per token (forward + backward) plus self- and cross-attention score/value products.
    flops = batch * (6 * params * n + 3 * depth * 4 * hidden * (n * n + n * s))
    times = []
    for index in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad()
        aligner(x, t, cond).float().pow(2).mean().backward()
        optimizer.step()
        torch.cuda.synchronize()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    achieved = flops / seconds / 1e12
    return [
        {"figure": "paper_aligner_step_samples_per_s", "device": torch.cuda.get_device_name(), "value": batch / seconds, "batch": batch},
        {"figure": "paper_aligner_tflops", "value": achieved, "peak_tflops": peak_tflops, "fraction_of_peak": achieved / peak_tflops},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="timed optimiser steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of the GPU (H100 SXM: 989)")
    add_config_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config, sections = job_config_from_args(args, TRAIN_SECTIONS)
    scaling = sections["scaling"]
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rates = {
        ("deepspeed", 1): measure(config, scaling, "deepspeed", 1, args.steps, args.warmup),
        ("deepspeed", 2): measure(config, scaling, "deepspeed", 2, args.steps, args.warmup),
        ("ddp", 2): measure(config, scaling, "ddp", 2, args.steps, args.warmup),
    }
    common = {"preset": config.preset, "global_batch": config.train.global_batch_size, "zero_stage": scaling.zero_stage, "device": "cpu"}
    for (backend, workers), value in rates.items():
        print(json.dumps({"figure": "train_samples_per_s", "backend": backend, "workers": workers, "value": round(value, 2), **common}))
    print(json.dumps({"figure": "scaling_2_vs_1_workers", "value": round(rates[("deepspeed", 2)] / rates[("deepspeed", 1)], 3), **common}))
    print(json.dumps({"figure": "deepspeed_vs_ddp_throughput_ratio", "value": round(rates[("deepspeed", 2)] / rates[("ddp", 2)], 3), **common}))
    if torch.cuda.is_available():
        for figure in gpu_figures(args.peak_tflops, args.steps, args.warmup):
            print(json.dumps(figure))
    ray.shutdown()


if __name__ == "__main__":
    main()
