"""The train function every Ray Train worker runs: DeepSpeed engine, resume, steps, periodic eval, checkpoints.

Checkpoint layout (one directory, every rank uploading its own files; ray_jobs/run_checkpoints.py):
    deepspeed/            engine.save_checkpoint: model and per-rank ZeRO optimiser shards (rank-specific names)
    rng_rank<r>.pt        each rank's noise generator
    ema.safetensors       EMA of every trainable parameter (rank 0)
    export/               inference export: EMA aligner + soft tokens + config (gap3d/export.py)
    config.yaml           the resolved job config (library tree + scaling section)
    progress.json         step, epoch and data position, the metrics of that step, the data fingerprint and
                          the LR continuation (ray_jobs/resume.py)
    evals.json            every periodic held-out evaluation so far: the learning curve (rank 0)
    complete.json         the completion record, written by rank 0 once every rank's files are in storage

Ray Train is told of each checkpoint once its record is written, through a pointer (`pointer.json`: the
checkpoint's step and URI) that rank 0 reports; after Ray restarts the worker group, `ray.train.get_checkpoint()`
returns the newest pointer (before any was reported, the workers start from the checkpoint the driver chose,
WorkerJob.resume_step), and a newer checkpoint whose record matches is taken over it.
"""

import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from safetensors.torch import load_file, save_file

from gap3d import storage
from gap3d.build import build_aligner
from gap3d.config import Gap3DConfig, save_config
from gap3d.evaluation import EvalSet, evaluate_alignment, evaluation_condition
from gap3d.export import EXPORT_DIR, save_export
from gap3d.features.format import FeatureBatch, FeatureManifest, RowCollator
from gap3d.features.identity import soft_token_mode
from gap3d.prompt_encoder import PromptEncoder
from gap3d.training import EMA, AlignerTrainModule, LRContinuation, trainable_parameters, with_soft_tokens
from ray_jobs.parallelize import build_engine, global_grad_norm, load_engine_state, update_ema
from ray_jobs.run_checkpoints import RunStorage, checkpoint_dir_name

logger = logging.getLogger("gap3d.train")

DEEPSPEED_TAG = "deepspeed"
PROGRESS_NAME = "progress.json"
EMA_NAME = "ema.safetensors"
EVALS_NAME = "evals.json"
POINTER_NAME = "pointer.json"  # what workers report to Ray Train: {"step", "uri"} of a verified checkpoint


@dataclass
class WorkerJob:
    """Everything a training worker needs, shipped from the driver."""

    config: Gap3DConfig
    scaling: object  # ray_jobs.train.TrainScaling
    manifest: FeatureManifest  # shapes of the training features
    eval_set: EvalSet | None  # held-out rows (and attribute probe) for periodic evaluation on rank 0, loaded by the driver
    data: str  # fingerprint of the training data (ray_jobs/resume.py), saved with each checkpoint
    lr_continuation: LRContinuation | None  # the LR curve after a resume that changed the schedule
    run: RunStorage  # where checkpoints go
    resume_step: int | None  # the checkpoint the driver chose and verified to start from (None: a new run)


def train_worker(loop_config: dict) -> None:
    """Ray Train's train_loop_per_worker: DeepSpeed engine, resume, train to train.max_steps, checkpoint, report."""
    job: WorkerJob = loop_config["job"]
    config, train, scaling = job.config, job.config.train, job.scaling
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    _configure_worker_logging(rank)
    device = torch.device("cuda", torch.cuda.current_device()) if scaling.use_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if train.precision == "bf16" else torch.float32
    micro_batch = train.global_batch_size // (world * train.grad_accum_steps)

    prompt_encoder = PromptEncoder.from_pretrained(config.vlm, device) if soft_token_mode(config) == "prompt_cache" else None
    module = AlignerTrainModule(build_aligner(config, seed=train.seed).to(device), config.flow, prompt_encoder)
    ema = EMA(trainable_parameters(module), train.ema_decay)  # before ZeRO-3 could partition the parameters
    engine, scheduler = build_engine(module, config, scaling, micro_batch, job.lr_continuation)
    generator = torch.Generator(device=device).manual_seed(train.seed * 1000 + rank)
    progress = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "samples": 0}
    evals: list[dict] = []  # the learning curve, kept by rank 0
    resumed_from = _restore(engine, scheduler, ema, generator, rank, job)
    if resumed_from is not None:
        progress, evals = resumed_from
        logger.info("resumed from step %d (epoch %d, %d batches in)", progress["step"], progress["epoch"], progress["batches_in_epoch"])
    resume_info = {"resumed_from_step": progress["step"]}
    metrics_sink = _PrometheusMetrics(context.get_experiment_name())

    cache_dtype = prompt_encoder.embed_tokens.weight.dtype if prompt_encoder is not None else None
    shard = ray.train.get_dataset_shard("train")
    collator = FeatureCollator(RowCollator(job.manifest))
    window = _Window()
    while progress["step"] < train.max_steps:
        batches = shard.iter_torch_batches(
            batch_size=micro_batch, collate_fn=collator, drop_last=True,
            local_shuffle_buffer_size=scaling.shuffle_buffer_rows or None, local_shuffle_seed=train.seed + progress["epoch"],
        )
        seen_in_epoch = 0
        for index, batch in enumerate(batches):
            seen_in_epoch += 1
            if index < progress["batches_in_epoch"]:
                continue  # already trained on before the checkpoint we resumed from
            boundary = engine.is_gradient_accumulation_boundary()
            losses = engine(batch.to(device, dtype, cache_dtype), generator)
            engine.backward(losses["loss"])
            grad_norm = global_grad_norm(engine) if boundary and scaling.zero_stage == 0 else None
            engine.step()
            progress["batches_in_epoch"] = index + 1
            progress["samples"] += len(batch) * world
            window.add(losses["loss"].item(), len(batch) * world)
            if not boundary:
                continue
            progress["step"] += 1
            update_ema(ema, engine, scaling.zero_stage)
            step = progress["step"]
            if not (_due(step, train.log_every, train.max_steps) or _due(step, train.checkpoint_every, train.max_steps)):
                continue
            metrics = {**window.flush(engine, scheduler, grad_norm), **progress, **resume_info}
            if rank == 0 and job.eval_set is not None and _due(step, train.eval_every, train.max_steps):
                metrics.update({f"eval_{k}": v for k, v in _evaluate(config, ema, prompt_encoder, job.eval_set, device).items()})
                evals.append({"step": step, **{k: v for k, v in metrics.items() if k.startswith("eval_")}})
            if rank == 0:
                logger.info("step %d/%d %s", step, train.max_steps, json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}))
            metrics_sink.record(metrics)
            if _due(step, train.checkpoint_every, train.max_steps):
                _save_and_report(engine, ema, generator, progress, metrics, evals, job, rank)
            else:
                ray.train.report(metrics)
            window.restart()  # evaluation and checkpointing do not count against throughput
            if step >= train.max_steps:
                break
        if seen_in_epoch == 0:
            raise RuntimeError(f"worker {rank} got no full micro-batch of {micro_batch} rows; use fewer workers or a smaller train.global_batch_size")
        if progress["step"] < train.max_steps:
            progress.update(epoch=progress["epoch"] + 1, batches_in_epoch=0)


class FeatureCollator(NumpyBatchCollateFn):
    """Ray Data collate_fn: numpy column batch -> FeatureBatch (gap3d.features.format.batch_from_rows)."""

    def __init__(self, collate: RowCollator):
        super().__init__()
        self.collate = collate

    def __call__(self, batch: dict) -> FeatureBatch:
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
        return {"loss": loss.item(), "lr": scheduler.get_last_lr()[0], "samples_per_s": self.samples / elapsed, "grad_norm": float(norm) if norm is not None else float("nan")}

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


def _evaluate(config: Gap3DConfig, ema: EMA, prompt_encoder: PromptEncoder | None, eval_set: EvalSet, device: torch.device) -> dict:
    """Held-out alignment metrics of the EMA weights."""
    aligner = build_aligner(config).to(device)
    aligner.load_state_dict(ema.split("aligner"))
    encoder = with_soft_tokens(prompt_encoder, ema.shadow["soft_tokens"]) if prompt_encoder is not None else None
    cond = evaluation_condition(eval_set.batch, encoder, device)
    return evaluate_alignment(aligner, cond, eval_set, config.flow, seed=config.train.seed)


def _save_and_report(engine, ema: EMA, generator: torch.Generator, progress: dict, metrics: dict, evals: list[dict], job: WorkerJob, rank: int) -> None:
    """Every rank writes its DeepSpeed shard (and RNG) into a local staging dir and uploads it into the checkpoint;
    rank 0 then writes the completion record, and only after it does any rank report the checkpoint to Ray Train."""
    step = progress["step"]
    if rank == 0:
        job.run.discard_record(step)  # a group restarted within the fit redoes a step whose checkpoint may be complete
    torch.distributed.barrier()
    with storage.staging_dir(f"gap3d-ckpt-{step}-") as directory:
        engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, client_state={"progress": dict(progress)})
        torch.save({"generator": generator.get_state()}, directory / f"rng_rank{rank}.pt")
        if rank == 0:
            save_file({name: value.cpu() for name, value in ema.state_dict().items()}, directory / EMA_NAME)
            save_export(directory / EXPORT_DIR, ema.split("aligner"), ema.shadow.get("soft_tokens"), job.config, step)
            save_config(job.config, directory / "config.yaml", {"scaling": job.scaling})
            continuation = dataclasses.asdict(job.lr_continuation) if job.lr_continuation else None
            record = {**progress, "metrics": metrics, "data": job.data, "lr_continuation": continuation}
            (directory / PROGRESS_NAME).write_text(json.dumps(record, indent=2, sort_keys=True))
            (directory / EVALS_NAME).write_text(json.dumps(evals, indent=1))
        files = job.run.upload(directory, step)
    writers = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(writers, {"rank": rank, "node": ray.get_runtime_context().get_node_id(), "files": files})
    if rank != 0:
        torch.distributed.barrier()  # rank 0 writes the record before anyone reports
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=checkpoint_dir_name(step))
        return
    job.run.write_record(step, writers)
    job.run.prune(step, job.config.train.keep_checkpoints)
    torch.distributed.barrier()
    with tempfile.TemporaryDirectory(prefix="gap3d-pointer-") as pointer:
        (Path(pointer) / POINTER_NAME).write_text(json.dumps({"step": step, "uri": job.run.checkpoint_uri(step)}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(pointer), checkpoint_dir_name=checkpoint_dir_name(step))


def _newest_recorded(run: RunStorage, known: int | None, rank: int) -> int | None:
    """The newest checkpoint step that matches its record, looking only above `known` (already verified): checked
    by rank 0, which reads each candidate once, and sent to every rank."""
    found = [known]
    if rank == 0:
        found[0] = next((step for step in run.steps() if step > (known or 0) and run.problem(step) is None), known)
    torch.distributed.broadcast_object_list(found, src=0)
    return found[0]


def reported_checkpoint(pointer: ray.train.Checkpoint | None) -> str | None:
    """The URI of the checkpoint a reported pointer names (None for none)."""
    return None if pointer is None else _read_pointer(pointer)["uri"]


def _read_pointer(pointer: ray.train.Checkpoint) -> dict:
    with pointer.as_directory() as directory:
        return json.loads((Path(directory) / POINTER_NAME).read_text())


def _restore(engine, scheduler, ema: EMA, generator: torch.Generator, rank: int, job: WorkerJob) -> tuple[dict, list[dict]] | None:
    """Load the checkpoint to start from -> (its progress, the evaluations so far), or None for a new run: the newest
    this fit reported when Ray Train restarted the group, else the one the driver chose; or a newer one whose record
    matches but whose pointer Ray never registered (the group died between the two)."""
    pointer = ray.train.get_checkpoint()
    step = _newest_recorded(job.run, _read_pointer(pointer)["step"] if pointer is not None else job.resume_step, rank)
    if step is None:
        return None
    checkpoint = ray.train.Checkpoint(job.run.checkpoint_path(step), filesystem=job.run.arrow_fs)
    with checkpoint.as_directory() as directory:
        directory = Path(directory)
        client_state = load_engine_state(engine, scheduler, str(directory), DEEPSPEED_TAG)
        ema.load_state_dict(load_file(directory / EMA_NAME, device=str(next(iter(ema.shadow.values())).device)))
        rng = directory / f"rng_rank{rank}.pt"
        if rng.is_file():
            generator.set_state(torch.load(rng)["generator"])
        evals = json.loads((directory / EVALS_NAME).read_text()) if (directory / EVALS_NAME).is_file() else []
    return dict(client_state["progress"]), evals
