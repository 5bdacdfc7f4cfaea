"""Train the aligner (and soft tokens) with Ray Train + DeepSpeed.

    python ray_jobs/train.py --features s3://bucket/features/train --storage s3://bucket/runs [--preset tiny] [key=value ...]
    ray job submit --working-dir . -- python ray_jobs/train.py ...

Each Ray Train worker wraps the trainable parts in DeepSpeed (ZeRO stage train.zero_stage), reads its shard
of the feature rows through `ray.train.get_dataset_shard("train")`, and every train.checkpoint_every steps
every rank saves its DeepSpeed state into one checkpoint directory that Ray Train merges into
`<storage>/<name>/checkpoint_<step>`; rank 0 adds the EMA weights, an inference export (`export/`), the
resolved config and the data position. Rerunning the same command resumes from the newest checkpoint.
"""

import argparse
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.fs
import ray
import ray.train
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file, save_file

from gap3d.build import build_aligner
from gap3d.config import Gap3DConfig, add_config_arguments, config_from_args, save_config
from gap3d.export import EXPORT_DIR, save_export
from gap3d.features import soft_token_mode
from gap3d.prompt_encoder import PromptEncoder
from gap3d.tiny_models import ensure_tiny_checkpoints
from gap3d.training import AlignerTrainModule, EMA, TrainBatch, evaluate_alignment, optimizer_state_digest, trainable_parameters, with_soft_tokens
from gap3d.training_data import RowCollator, arrow_filesystem, check_features, condition_for, count_rows, feature_files, load_rows
from ray_jobs.parallelize import build_engine, global_grad_norm, init_single_process_group, update_ema
from ray_jobs.pipeline import stream_features, stream_manifest

logger = logging.getLogger("gap3d.train")

DEEPSPEED_TAG = "deepspeed"
PROGRESS_NAME = "progress.json"
EMA_NAME = "ema.safetensors"
FAULT_MARKER = ".gap3d_fault_injected"


@dataclasses.dataclass
class WorkerJob:
    """Everything a training worker needs, shipped from the driver."""

    config: Gap3DConfig
    manifest: object  # FeatureManifest of the training features
    eval_set: TrainBatch | None  # held-out rows for periodic evaluation (rank 0), loaded by the driver
    in_process: bool  # ScalingConfig(num_workers=0): one process, no Ray workers
    fail_once_at_step: int | None  # test hook: rank 0 raises once when reaching this step
    marker: tuple | None  # (pyarrow filesystem, path) remembering that the fault was injected


def check_start(config: Gap3DConfig, features: str | None, stream: str | None):
    """Fail before any worker starts when inputs or config cannot work; returns the feature manifest (or None)."""
    if (features is None) == (stream is None):
        raise ValueError("give exactly one of --features URI (preprocessed feature Parquet) or --stream URI (raw shards)")
    if features is None:
        return None
    manifest = check_features(features, config)
    rows = count_rows(features)
    if rows < config.train.global_batch_size:
        raise ValueError(f"features at {features} hold {rows} rows, fewer than one global batch (train.global_batch_size={config.train.global_batch_size})")
    return manifest


def build_dataset(config: Gap3DConfig, features: str | None, stream: str | None):
    """The Ray Dataset of feature rows: read from Parquet, or encoded on the fly from raw shards."""
    if stream is not None:
        return stream_features(config, stream)
    filesystem, _ = arrow_filesystem(features)
    paths = [arrow_filesystem(path)[1] for path in feature_files(features)]
    dataset = ray.data.read_parquet(paths, filesystem=filesystem)
    # Each epoch otherwise re-reads the Parquet files: seconds per epoch, which dominates small runs.
    return dataset.materialize() if config.train.materialize_features else dataset


def run_training(
    config: Gap3DConfig,
    storage: str,
    features: str | None = None,
    stream: str | None = None,
    eval_features: str | None = None,
    name: str = "gap3d-train",
    max_failures: int = 0,
    in_process: bool = False,
    fail_once_at_step: int | None = None,
) -> ray.train.Result:
    """Train with TorchTrainer; rerunning with the same storage and name resumes from the newest checkpoint."""
    manifest = check_start(config, features, stream)
    if manifest is None:
        manifest = stream_manifest(config)
        manifest.check_compatible(config)
    eval_set = load_rows(eval_features, config, limit=config.train.eval_samples)[0] if eval_features else None
    storage_fs, storage_path = arrow_filesystem(storage)
    marker = (storage_fs, f"{storage_path}/{name}/{FAULT_MARKER}") if fail_once_at_step else None
    job = WorkerJob(config, manifest, eval_set, in_process, fail_once_at_step, marker)
    train = config.train
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=0 if in_process else train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={"CPU": train.worker_cpus, **({"GPU": 1} if train.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
        ),
        datasets={"train": build_dataset(config, features, stream)},
    )
    return trainer.fit()


# ---------------------------------------------------------------- worker side


def train_worker(loop_config: dict) -> None:
    """Ray Train's train_loop_per_worker: DeepSpeed engine, resume, train to train.max_steps, checkpoint, report."""
    job: WorkerJob = loop_config["job"]
    if not job.in_process:
        return _train(job)
    # DeepSpeed reads these; they are removed again so Ray's local mode never mistakes this process for torchrun.
    rank_env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    saved = {key: os.environ.get(key) for key in rank_env}
    os.environ.update(rank_env)
    init_single_process_group()
    try:
        return _train(job)
    finally:
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


def _train(job: WorkerJob) -> None:
    config, train = job.config, job.config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if not job.in_process:
        _configure_worker_logging(rank)
    device = torch.device("cuda", torch.cuda.current_device()) if train.use_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if train.precision == "bf16" else torch.float32
    micro_batch = train.global_batch_size // (world * train.grad_accum_steps)
    if micro_batch * world * train.grad_accum_steps != train.global_batch_size:
        raise ValueError(f"train.global_batch_size {train.global_batch_size} is not divisible by {world} workers x train.grad_accum_steps {train.grad_accum_steps}")

    prompt_encoder = PromptEncoder.from_pretrained(config.vlm, device) if soft_token_mode(config) == "prompt_cache" else None
    module = AlignerTrainModule(build_aligner(config, seed=train.seed).to(device), config.flow, prompt_encoder)
    ema = EMA(trainable_parameters(module), train.ema_decay)  # before ZeRO-3 could partition the parameters
    engine, scheduler = build_engine(module, config, micro_batch)
    generator = torch.Generator(device=device).manual_seed(train.seed * 1000 + rank)
    progress = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "samples": 0}
    resume_info = {"resumed_from_step": 0, "resume_optimizer_digest": 0.0}
    resumed = _restore(engine, ema, generator, rank)
    if resumed is not None:
        progress, resume_info["resume_optimizer_digest"] = resumed
        resume_info["resumed_from_step"] = progress["step"]
        logger.info("resumed from step %d (epoch %d, %d batches in)", progress["step"], progress["epoch"], progress["batches_in_epoch"])
    metrics_sink = _PrometheusMetrics(context.get_experiment_name()) if not job.in_process else None

    cache_dtype = prompt_encoder.embed_tokens.weight.dtype if prompt_encoder is not None else None
    shard = ray.train.get_dataset_shard("train")
    collator = _Collator(RowCollator(job.manifest, soft_token_mode(config)))
    window = _Window()
    while progress["step"] < train.max_steps:
        batches = shard.iter_torch_batches(
            batch_size=micro_batch, collate_fn=collator, drop_last=True,
            local_shuffle_buffer_size=train.shuffle_buffer_rows or None, local_shuffle_seed=train.seed + progress["epoch"],
        )
        seen_in_epoch = 0
        for index, batch in enumerate(batches):
            seen_in_epoch += 1
            if index < progress["batches_in_epoch"]:
                continue  # already trained on before the checkpoint we resumed from
            boundary = engine.is_gradient_accumulation_boundary()
            losses = engine(batch.to(device, dtype, cache_dtype), generator)
            engine.backward(losses["loss"])
            grad_norm = global_grad_norm(engine) if boundary and train.zero_stage == 0 else None
            engine.step()
            progress["batches_in_epoch"] = index + 1
            progress["samples"] += len(batch) * world
            window.add(losses["loss"].item(), len(batch) * world)
            if not boundary:
                continue
            progress["step"] += 1
            update_ema(ema, engine, train.zero_stage)
            step = progress["step"]
            _maybe_inject_fault(job, rank, step)
            report = _due(step, train.log_every, train.max_steps) or _due(step, train.checkpoint_every, train.max_steps)
            if not report:
                continue
            metrics = {**window.flush(engine, scheduler, grad_norm), **progress, **resume_info}
            if rank == 0 and job.eval_set is not None and _due(step, train.eval_every, train.max_steps):
                metrics.update({f"eval_{k}": v for k, v in _evaluate(config, ema, prompt_encoder, job.eval_set, device).items()})
            if rank == 0:
                logger.info("step %d/%d %s", step, train.max_steps, json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}))
            if metrics_sink is not None:
                metrics_sink.record(metrics)
            if _due(step, train.checkpoint_every, train.max_steps):
                _save_and_report(engine, ema, generator, progress, metrics, config, rank, job.in_process)
            else:
                ray.train.report(metrics)
            window.restart()  # evaluation and checkpointing do not count against throughput
            if step >= train.max_steps:
                break
        if seen_in_epoch == 0:
            raise RuntimeError(f"worker {rank} got no full micro-batch of {micro_batch} rows; use fewer workers or a smaller train.global_batch_size")
        if progress["step"] < train.max_steps:
            progress.update(epoch=progress["epoch"] + 1, batches_in_epoch=0)


class _Collator(NumpyBatchCollateFn):
    """Ray Data collate_fn: numpy column batch -> TrainBatch (gap3d.training_data.collate_rows)."""

    def __init__(self, collate: RowCollator):
        super().__init__()
        self.collate = collate

    def __call__(self, batch: dict) -> TrainBatch:
        return self.collate(batch)


def _configure_worker_logging(rank: int) -> None:
    """Progress lines from gap3d loggers on the worker's stderr (Ray forwards it to the driver and job logs)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s"))
    package_logger = logging.getLogger("gap3d")
    package_logger.handlers[:] = [handler]
    package_logger.setLevel(logging.INFO)
    package_logger.propagate = False


def _due(step: int, every: int, max_steps: int) -> bool:
    return step % every == 0 or step == max_steps


class _Window:
    """Loss and throughput since the last report."""

    def __init__(self):
        self.restart()

    def add(self, loss: float, samples: int) -> None:
        self.losses.append(loss)
        self.samples += samples

    def flush(self, engine, scheduler, grad_norm: float | None) -> dict:
        elapsed = time.perf_counter() - self.start
        loss = torch.tensor(sum(self.losses) / max(1, len(self.losses)))
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(loss)
            loss /= torch.distributed.get_world_size()
        norm = engine.get_global_grad_norm() if grad_norm is None else grad_norm
        metrics = {"loss": loss.item(), "lr": scheduler.get_last_lr()[0], "samples_per_s": self.samples / elapsed, "grad_norm": float(norm) if norm is not None else float("nan")}
        return metrics

    def restart(self) -> None:
        self.start, self.losses, self.samples = time.perf_counter(), [], 0


class _PrometheusMetrics:
    """Training gauges exported through Ray's metrics agent (Prometheus format on each node's metrics port)."""

    NAMES = {"loss": "flow-matching loss", "lr": "learning rate", "samples_per_s": "training samples per second", "grad_norm": "global gradient norm", "step": "optimiser step"}

    def __init__(self, run: str):
        from ray.util.metrics import Gauge

        self.tags = {"run": run}
        self.gauges = {key: Gauge(f"gap3d_train_{key}", description=text, tag_keys=("run",)) for key, text in self.NAMES.items()}

    def record(self, metrics: dict) -> None:
        for key, gauge in self.gauges.items():
            gauge.set(float(metrics[key]), tags=self.tags)


def _evaluate(config: Gap3DConfig, ema: EMA, prompt_encoder: PromptEncoder | None, eval_set: TrainBatch, device: torch.device) -> dict:
    """Held-out alignment metrics of the EMA weights."""
    aligner = build_aligner(config).to(device)
    aligner.load_state_dict(ema.split("aligner"))
    encoder = with_soft_tokens(prompt_encoder, ema.shadow["soft_tokens"]) if prompt_encoder is not None else None
    cond = condition_for(eval_set, encoder, device)
    return evaluate_alignment(aligner, cond.float(), eval_set.dino, config.flow, seed=config.train.seed)


def _maybe_inject_fault(job: WorkerJob, rank: int, step: int) -> None:
    """Test hook: rank 0 raises once at step `fail_once_at_step`; a marker in storage makes it once per run."""
    if job.fail_once_at_step != step or rank != 0:
        return
    filesystem, path = job.marker
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        return
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as handle:
        handle.write(b"1")
    raise RuntimeError(f"injected fault at step {step} (test hook fail_once_at_step)")


def _save_and_report(engine, ema: EMA, generator: torch.Generator, progress: dict, metrics: dict, config: Gap3DConfig, rank: int, in_process: bool) -> None:
    """Every rank writes its DeepSpeed shard (and RNG) into a local dir; Ray Train merges and uploads them."""
    directory = Path(tempfile.mkdtemp(prefix=f"gap3d-ckpt-{progress['step']}-"))
    engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, client_state={"progress": dict(progress)})
    torch.save({"generator": generator.get_state()}, directory / f"rng_rank{rank}.pt")
    if rank == 0:
        save_file({name: value.cpu() for name, value in ema.state_dict().items()}, directory / EMA_NAME)
        save_export(directory / EXPORT_DIR, ema.split("aligner"), ema.shadow.get("soft_tokens"), config, progress["step"])
        save_config(config, directory / "config.yaml")
        (directory / PROGRESS_NAME).write_text(json.dumps({**progress, "metrics": metrics}, indent=2, sort_keys=True))
    checkpoint = ray.train.Checkpoint.from_directory(str(directory))
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{progress['step']:08d}")
    if not in_process:
        shutil.rmtree(directory, ignore_errors=True)


def _restore(engine, ema: EMA, generator: torch.Generator, rank: int):
    """Load the newest reported checkpoint, if any -> (progress, optimiser-state digest) or None."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        directory = Path(directory)
        _, client_state = engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG)
        ema.load_state_dict(load_file(directory / EMA_NAME, device=str(next(iter(ema.shadow.values())).device)))
        rng = directory / f"rng_rank{rank}.pt"
        if rng.is_file():
            generator.set_state(torch.load(rng)["generator"])
    return dict(client_state["progress"]), optimizer_state_digest(engine.optimizer.state_dict())


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the GAP3D aligner with Ray Train + DeepSpeed.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", help="feature Parquet directory written by ray_jobs/preprocess.py (local or s3://)")
    source.add_argument("--stream", help="raw image-caption shards, encoded on the fly by Ray Data actor pools")
    parser.add_argument("--storage", required=True, help="RunConfig storage_path for checkpoints (local dir or s3://)")
    parser.add_argument("--name", default="gap3d-train", help="run name under --storage; rerun with the same name to resume")
    parser.add_argument("--eval-features", default=None, help="held-out feature directory evaluated every train.eval_every steps")
    parser.add_argument("--max-failures", type=int, default=2, help="worker-group restarts from the last checkpoint before giving up")
    parser.add_argument("--in-process", action="store_true", help="run the train function in this process (ScalingConfig(num_workers=0))")
    parser.add_argument("--fail-once-at-step", type=int, default=None, help=argparse.SUPPRESS)  # fault-injection test hook
    add_config_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = config_from_args(args)
    ensure_tiny_checkpoints(config)
    result = run_training(
        config, args.storage, features=args.features, stream=args.stream, eval_features=args.eval_features,
        name=args.name, max_failures=args.max_failures, in_process=args.in_process, fail_once_at_step=args.fail_once_at_step,
    )
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    print(json.dumps({"checkpoint": checkpoint, "metrics": result.metrics}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
