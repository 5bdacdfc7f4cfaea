"""Training throughput: samples/s with 1 and 2 Ray Train workers, where the time of a step goes, DeepSpeed against
plain DDP; one JSON line per figure.

    python benchmarks/train.py [--preset tiny] [--steps 40] [--warmup 3] [key=value ...]

Every worker runs the real training step (soft tokens through the frozen VLM on prompt caches, flow-matching loss,
backward, optimiser step) on feature rows the real encoders wrote, read as training reads them (a Ray Dataset
shard through `iter_torch_batches` and the training collate function). Each configuration reports rank 0's
medians over the timed steps: samples/s of the whole step (all workers' samples); the seconds of each phase
(waiting for the batch, forward, backward with DeepSpeed's gradient reduction, optimiser step); and the seconds a
batch takes fetched with no step beside it (the CPU the data path costs, otherwise spent by Ray Data's prefetch
thread next to the step). Beside them: one worker at half the global batch (one of 2 workers' share of the work,
so the per-step costs that do not shrink with the batch show), and a gloo all-reduce of the trainable parameters'
size on its own. Ratios come from the same run. As a reference without Ray, the same step also runs in plain
processes (torch.multiprocessing, gloo DDP, batches held in memory): 1 process at the global batch and at half of it,
and 2 processes, which separates what the model and the machine allow from what Ray costs; the ceiling figure is
what 2 workers could reach with no contention at all, one process's step at the global batch over (its step at half
the batch plus the all-reduce). With a GPU, it also times the paper-preset aligner step in bf16
and reports achieved TFLOP/s against the bf16 peak given by --peak-tflops.
"""

import argparse
import dataclasses
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.flops import aligner_train_flops, utilisation
from gap3d.build import build_aligner, derive_shapes
from gap3d.config import Gap3DConfig
from gap3d.data.encode import FeatureEncoder
from gap3d.features.format import RowCollator
from gap3d.prompt_encoder import PromptEncoder
from gap3d.training import AlignerTrainModule, build_optimizer, trainable_parameters
from miniature.checkpoints.paper_widths import paper_config_without_weights
from ray_jobs.config import add_config_arguments, job_config_from_args
from ray_jobs.train import TRAIN_SECTIONS
from ray_jobs.train_worker import FeatureCollator

CAPTIONS = (
    "a small red cone on the left",
    "a large blue cube in the center",
    "a medium green sphere on the right",
    "a white torus in the middle",
)
PHASES = ("data", "forward", "backward", "optimizer_step")
ALLREDUCE_REPEATS = 20


def feature_rows(config: Gap3DConfig, rows: int):
    """`rows` feature rows (an Arrow table) encoded by the real encoders from random images, and their manifest."""
    encoder = FeatureEncoder(config)
    images = np.random.default_rng(0).integers(
        0, 256, (rows, config.dino.image_size, config.dino.image_size, 3), dtype=np.uint8
    )
    table = encoder.encode(
        [f"{i:06d}" for i in range(rows)], [CAPTIONS[i % len(CAPTIONS)] for i in range(rows)], images
    )
    return table, encoder.manifest


def _batches(shard, micro_batch: int, collate, shuffle_rows: int):
    """Training's batch stream over epochs, without end."""
    epoch = 0
    while True:
        yield from shard.iter_torch_batches(
            batch_size=micro_batch,
            collate_fn=collate,
            drop_last=True,
            local_shuffle_buffer_size=shuffle_rows or None,
            local_shuffle_seed=epoch,
        )
        epoch += 1


def _allreduce_seconds(numel: int) -> float | None:
    """Median seconds of a gloo all-reduce of `numel` float32 values across the workers (None on one worker)."""
    if torch.distributed.get_world_size() == 1:
        return None
    tensor = torch.ones(numel)
    times = []
    for _ in range(ALLREDUCE_REPEATS):
        start = time.perf_counter()
        torch.distributed.all_reduce(tensor)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def benchmark_worker(loop_config: dict) -> None:
    """Time `steps` optimiser steps after `warmup` with DeepSpeed or DDP; rank 0 reports medians per phase."""
    import ray.train
    import ray.train.torch

    from ray_jobs.parallelize import build_engine

    config, scaling = loop_config["config"], loop_config["scaling"]
    backend, steps, warmup = loop_config["backend"], loop_config["steps"], loop_config["warmup"]
    world = ray.train.get_context().get_world_size()
    micro_batch = config.train.global_batch_size // world
    prompt_encoder = PromptEncoder.from_pretrained(config.vlm)
    module = AlignerTrainModule(build_aligner(config, seed=0), config.flow, prompt_encoder)
    generator = torch.Generator().manual_seed(0)
    collate = FeatureCollator(RowCollator(loop_config["manifest"]))
    batches = _batches(ray.train.get_dataset_shard("train"), micro_batch, collate, scaling.shuffle_buffer_rows)
    if backend == "deepspeed":
        engine, _ = build_engine(module, config, scaling, micro_batch)
        forward, backward, step = (lambda batch: engine(batch, generator)["loss"]), engine.backward, engine.step
    else:
        model = ray.train.torch.prepare_model(module, move_to_device=False)
        optimizer = build_optimizer(module, config.train)

        def forward(batch):
            optimizer.zero_grad()
            return model(batch, generator)["loss"]

        def step():
            torch.nn.utils.clip_grad_norm_(module.parameters(), config.train.grad_clip)
            optimizer.step()

        backward = torch.Tensor.backward

    times = {phase: [] for phase in PHASES}
    for index in range(warmup + steps):
        marks = [time.perf_counter()]
        batch = next(batches)
        marks.append(time.perf_counter())
        loss = forward(batch)
        marks.append(time.perf_counter())
        backward(loss)
        marks.append(time.perf_counter())
        step()
        marks.append(time.perf_counter())
        if index >= warmup:
            for phase, begin, end in zip(PHASES, marks, marks[1:]):
                times[phase].append(end - begin)
    totals = [sum(parts) for parts in zip(*times.values())]
    fetches = []  # the data path's own cost per batch: normally paid by Ray Data's prefetch thread beside the step
    for _ in range(steps):
        start = time.perf_counter()
        next(batches)
        fetches.append(time.perf_counter() - start)
    numel = sum(p.numel() for p in trainable_parameters(module).values())
    figures = {
        "samples_per_s": statistics.median(micro_batch * world / total for total in totals),
        "phases": {phase: statistics.median(values) for phase, values in times.items()},
        "batch_alone_s": statistics.median(fetches),
        "allreduce_s": _allreduce_seconds(numel),
        "gradient_bytes": numel * 4,
        "torch_threads": torch.get_num_threads(),
    }
    # Ray Train V2 keeps the metrics of checkpointed reports only, so the figures travel with a (tiny) checkpoint.
    directory = tempfile.mkdtemp()
    Path(directory, "figures.json").write_text(json.dumps(figures))
    ray.train.report({"figures": json.dumps(figures)}, checkpoint=ray.train.Checkpoint.from_directory(directory))


def measure(
    config: Gap3DConfig, scaling, dataset, manifest, backend: str, workers: int, steps: int, warmup: int
) -> dict:
    """One configuration's figures (see benchmark_worker)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        benchmark_worker,
        train_loop_config={
            "config": config,
            "scaling": scaling,
            "manifest": manifest,
            "backend": backend,
            "steps": steps,
            "warmup": warmup,
        },
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=False, resources_per_worker={"CPU": scaling.worker_cpus}
        ),
        run_config=RunConfig(name=f"bench-{backend}-{workers}-{time.time_ns()}", storage_path="/tmp/gap3d-bench"),
        datasets={"train": dataset},
    )
    return json.loads(trainer.fit().metrics["figures"])


def plain_worker(
    rank: int, world: int, config: Gap3DConfig, table, manifest, steps: int, warmup: int, port: int, queue
) -> None:
    """One process of the no-Ray reference: DDP over gloo on batches held in memory; rank 0 puts its median step."""
    import os

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    micro_batch = config.train.global_batch_size // world
    module = AlignerTrainModule(build_aligner(config, seed=0), config.flow, PromptEncoder.from_pretrained(config.vlm))
    model = torch.nn.parallel.DistributedDataParallel(module) if world > 1 else module
    optimizer = build_optimizer(module, config.train)
    generator = torch.Generator().manual_seed(rank)
    collate = FeatureCollator(RowCollator(manifest))
    columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    starts = range(rank * micro_batch, table.num_rows - micro_batch + 1, world * micro_batch)
    batches = [
        collate({name: values[start : start + micro_batch] for name, values in columns.items()}) for start in starts
    ]
    times = []
    for index in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        model(batches[index % len(batches)], generator)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), config.train.grad_clip)
        optimizer.step()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    if rank == 0:
        queue.put(statistics.median(times))
    torch.distributed.destroy_process_group()


def plain_step_seconds(config: Gap3DConfig, table, manifest, world: int, steps: int, warmup: int) -> float:
    """Median step seconds of `world` plain processes (no Ray) at the config's global batch."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [
        context.Process(target=plain_worker, args=(rank, world, config, table, manifest, steps, warmup, port, queue))
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    try:
        return queue.get(timeout=600)
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()


def gpu_figures(peak_tflops: float, steps: int, warmup: int) -> list[dict]:
    """Paper-preset aligner forward+backward+AdamW in bf16 on one GPU: samples/s and achieved TFLOP/s."""
    config = paper_config_without_weights(tempfile.mkdtemp(prefix="gap3d-train-bench-"))
    aligner = build_aligner(config, seed=0).cuda().to(torch.bfloat16)
    optimizer = torch.optim.AdamW(aligner.parameters(), lr=1e-4)
    batch = 8
    x = torch.randn(batch, config.aligner.num_tokens, config.aligner.token_dim, device="cuda", dtype=torch.bfloat16)
    cond = torch.randn(
        batch, config.aligner.num_cond_tokens, config.aligner.cond_dim, device="cuda", dtype=torch.bfloat16
    )
    t = torch.rand(batch, device="cuda")
    flops = aligner_train_flops(config.aligner, batch)
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
    use = utilisation(flops, seconds, peak_tflops)
    return [
        {
            "figure": "paper_aligner_step_samples_per_s",
            "device": torch.cuda.get_device_name(),
            "value": batch / seconds,
            "batch": batch,
        },
        {
            "figure": "paper_aligner_tflops",
            "value": use["tflops"],
            "peak_tflops": peak_tflops,
            "fraction_of_peak": use["mfu"],
        },
    ]


def emit(figure: str, value: float, **keys) -> None:
    """One JSON line of one figure."""
    print(json.dumps({"figure": figure, "value": value, **keys}))


def emit_run(figures: dict, keys: dict) -> None:
    """The figures of one measured configuration: throughput, the step's phases, the batch alone, the all-reduce."""
    emit("train_samples_per_s", round(figures["samples_per_s"], 2), torch_threads=figures["torch_threads"], **keys)
    for phase, seconds in figures["phases"].items():
        emit("train_step_phase_s", round(seconds, 5), phase=phase, **keys)
    emit("data_batch_alone_s", round(figures["batch_alone_s"], 5), **keys)
    if figures["allreduce_s"] is not None:
        emit("gloo_allreduce_s", round(figures["allreduce_s"], 5), bytes=figures["gradient_bytes"], **keys)


def emit_scaling(one: dict, one_half: dict, two: dict, ddp: dict, plain: dict, full: int, half: int, keys: dict):
    """How 2 workers compare with 1, and where the difference goes (`plain`: {(workers, batch): step seconds})."""
    step_s = {name: sum(run["phases"].values()) for name, run in (("one", one), ("one_half", one_half), ("two", two))}
    emit("scaling_2_vs_1_workers", round(two["samples_per_s"] / one["samples_per_s"], 3), **keys)
    # Where the 2-worker step loses against half the 1-worker step: costs that do not shrink with the batch (1 worker,
    # half batch, against half the full-batch step), then communication and sharing the machine (2 workers against
    # that).
    emit("step_s_lost_to_per_step_costs", round(step_s["one_half"] - step_s["one"] / 2, 5), **keys)
    emit("step_s_lost_to_two_workers", round(step_s["two"] - step_s["one_half"], 5), **keys)
    common = {key: value for key, value in keys.items() if key != "global_batch"}
    for (world, global_batch), seconds in plain.items():
        emit(
            "plain_processes_samples_per_s",
            round(global_batch / seconds, 2),
            workers=world,
            global_batch=global_batch,
            **common,
        )
    emit("scaling_2_vs_1_plain_processes", round(plain[(1, full)] / plain[(2, full)], 3), **keys)
    ceiling = plain[(1, full)] / (plain[(1, half)] + two["allreduce_s"])
    emit("scaling_2_vs_1_ceiling", round(ceiling, 3), **keys)
    emit("deepspeed_vs_ddp_throughput_ratio", round(two["samples_per_s"] / ddp["samples_per_s"], 3), **keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed optimiser steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of the GPU (H100 SXM: 989)")
    add_config_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config, sections = job_config_from_args(args, TRAIN_SECTIONS)
    config = derive_shapes(config)
    scaling = sections["scaling"]
    full = config.train.global_batch_size
    half = dataclasses.replace(config, train=dataclasses.replace(config.train, global_batch_size=full // 2))
    table, manifest = feature_rows(config, 8 * full)
    plain = {  # measured before Ray starts, so nothing of Ray's runs beside them
        (world, sized.train.global_batch_size): plain_step_seconds(
            sized, table, manifest, world, args.steps, args.warmup
        )
        for world, sized in ((1, config), (1, half), (2, config))
    }
    import ray
    import ray.data

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    dataset = ray.data.from_arrow(table).materialize()
    runs = {  # (backend, workers, global batch) -> figures
        (backend, workers, sized.train.global_batch_size): measure(
            sized, scaling, dataset, manifest, backend, workers, args.steps, args.warmup
        )
        for backend, workers, sized in (
            ("deepspeed", 1, config),
            ("deepspeed", 1, half),
            ("deepspeed", 2, config),
            ("ddp", 2, config),
        )
    }
    common = {"preset": config.preset, "zero_stage": scaling.zero_stage, "device": "cpu"}
    for (backend, workers, batch), figures in runs.items():
        emit_run(figures, {"backend": backend, "workers": workers, "global_batch": batch, **common})
    half_batch = half.train.global_batch_size
    emit_scaling(
        runs[("deepspeed", 1, full)],
        runs[("deepspeed", 1, half_batch)],
        runs[("deepspeed", 2, full)],
        runs[("ddp", 2, full)],
        plain,
        full,
        half_batch,
        {"global_batch": full, **common},
    )
    if torch.cuda.is_available():
        for figure in gpu_figures(args.peak_tflops, args.steps, args.warmup):
            print(json.dumps(figure))
    ray.shutdown()


if __name__ == "__main__":
    main()
