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
import resource
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
    eval_set: (
        EvalSet | None
    )  # held-out rows (and attribute probe) for periodic evaluation on rank 0, loaded by the driver
    data: str  # fingerprint of the training data (ray_jobs/resume.py), saved with each checkpoint
    lr_continuation: LRContinuation | None  # the LR curve after a resume that changed the schedule
    run: RunStorage  # where checkpoints go
    resume_step: int | None  # the checkpoint the driver chose and verified to start from (None: a new run)


def train_worker(loop_config: dict) -> None:
    """Ray Train's train_loop_per_worker: DeepSpeed engine, resume, train to train.max_steps, checkpoint, report."""
    run = _WorkerRun(loop_config["job"])
    while run.progress["step"] < run.train.max_steps:
        run.train_epoch()


class _WorkerRun:
    """One worker's training state: the DeepSpeed engine, EMA, noise generator, data position and learning curve."""

    def __init__(self, job: WorkerJob):
        self.job, self.config, self.train, self.scaling = job, job.config, job.config.train, job.scaling
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        _configure_worker_logging(self.rank)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.scaling.use_gpu else torch.device("cpu")
        self.dtype = torch.bfloat16 if self.train.precision == "bf16" else torch.float32
        self.micro_batch = self.train.global_batch_size // (self.world * self.train.grad_accum_steps)
        config = self.config
        self.prompt_encoder = (
            PromptEncoder.from_pretrained(config.vlm, self.device)
            if soft_token_mode(config) == "prompt_cache"
            else None
        )
        self.cache_dtype = self.prompt_encoder.embed_tokens.weight.dtype if self.prompt_encoder is not None else None
        module = AlignerTrainModule(
            build_aligner(config, seed=self.train.seed).to(self.device), config.flow, self.prompt_encoder
        )
        self.ema = EMA(
            trainable_parameters(module), self.train.ema_decay
        )  # before ZeRO-3 could partition the parameters
        self.engine, self.scheduler = build_engine(module, config, self.scaling, self.micro_batch, job.lr_continuation)
        self.generator = torch.Generator(device=self.device).manual_seed(self.train.seed * 1000 + self.rank)
        self.progress = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "samples": 0}
        self.evals: list[dict] = []  # the learning curve, kept by rank 0
        resumed_from = _restore(self.engine, self.scheduler, self.ema, self.generator, self.rank, job)
        if resumed_from is not None:
            self.progress, self.evals = resumed_from
            logger.info(
                "resumed from step %d (epoch %d, %d batches in)",
                *(self.progress[k] for k in ("step", "epoch", "batches_in_epoch")),
            )
        self.resume_info = {"resumed_from_step": self.progress["step"]}
        self.metrics_sink = _PrometheusMetrics(context.get_experiment_name())
        self.shard = ray.train.get_dataset_shard("train")
        self.collator = FeatureCollator(RowCollator(job.manifest))
        self.window = _Window()

    def train_epoch(self) -> None:
        """Train on this epoch's batches from the data position on, until the epoch or train.max_steps ends."""
        progress = self.progress
        batches = self.shard.iter_torch_batches(
            batch_size=self.micro_batch,
            collate_fn=self.collator,
            drop_last=True,
            local_shuffle_buffer_size=self.scaling.shuffle_buffer_rows or None,
            local_shuffle_seed=self.train.seed + progress["epoch"],
        )
        seen_in_epoch = 0
        for index, batch in enumerate(batches):
            seen_in_epoch += 1
            if index < progress["batches_in_epoch"]:
                continue  # already trained on before the checkpoint we resumed from
            if self._micro_step(index, batch) and progress["step"] >= self.train.max_steps:
                break
        if seen_in_epoch == 0:
            raise RuntimeError(
                f"worker {self.rank} got no full micro-batch of {self.micro_batch} rows; use fewer workers or a "
                "smaller train.global_batch_size"
            )
        if progress["step"] < self.train.max_steps:
            progress.update(epoch=progress["epoch"] + 1, batches_in_epoch=0)

    def _micro_step(self, index: int, batch: FeatureBatch) -> bool:
        """Forward, backward and (at an accumulation boundary) the optimiser step -> whether an optimiser step ended."""
        engine, progress = self.engine, self.progress
        boundary = engine.is_gradient_accumulation_boundary()
        losses = engine(batch.to(self.device, self.dtype, self.cache_dtype), self.generator)
        engine.backward(losses["loss"])
        grad_norm = global_grad_norm(engine) if boundary and self.scaling.zero_stage == 0 else None
        engine.step()
        progress["batches_in_epoch"] = index + 1
        progress["samples"] += len(batch) * self.world
        self.window.add(losses["loss"].item(), len(batch) * self.world)
        if boundary:
            progress["step"] += 1
            update_ema(self.ema, engine, self.scaling.zero_stage)
            self._report(grad_norm)
        return boundary

    def _report(self, grad_norm: float | None) -> None:
        """Log, evaluate, checkpoint and report at the steps their cadences name."""
        train, step = self.train, self.progress["step"]
        checkpoint = _due(step, train.checkpoint_every, train.max_steps)
        if not (checkpoint or _due(step, train.log_every, train.max_steps)):
            return
        window = self.window.flush(self.engine, self.scheduler, grad_norm)
        metrics = {**window, "peak_memory_gib": peak_memory_gib(self.device), **self.progress, **self.resume_info}
        if self.rank == 0 and self.job.eval_set is not None and _due(step, train.eval_every, train.max_steps):
            evaluation = _evaluate(self.config, self.ema, self.prompt_encoder, self.job.eval_set, self.device)
            metrics.update({f"eval_{k}": v for k, v in evaluation.items()})
            self.evals.append({"step": step, **{k: v for k, v in metrics.items() if k.startswith("eval_")}})
        if self.rank == 0:
            logger.info(
                "step %d/%d %s",
                step,
                train.max_steps,
                json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}),
            )
        self.metrics_sink.record(metrics)
        if checkpoint:
            _save_and_report(
                self.engine, self.ema, self.generator, self.progress, metrics, self.evals, self.job, self.rank
            )
        else:
            ray.train.report(metrics)
        self.window.restart()  # evaluation and checkpointing do not count against throughput


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


def peak_memory_gib(device: torch.device) -> float:
    """The worker's peak memory so far: allocated on its GPU, else the process's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


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
        return {
            "loss": loss.item(),
            "lr": scheduler.get_last_lr()[0],
            "samples_per_s": self.samples / elapsed,
            "grad_norm": float(norm) if norm is not None else float("nan"),
        }

    def restart(self) -> None:
        self.start, self.losses, self.samples = time.perf_counter(), [], 0


class _PrometheusMetrics:
    """Training gauges exported through Ray's metrics agent (Prometheus format on each node's metrics port)."""

    NAMES = {
        "loss": "flow-matching loss",
        "lr": "learning rate",
        "samples_per_s": "training samples per second",
        "grad_norm": "global gradient norm",
        "step": "optimiser step",
    }

    def __init__(self, run: str):
        from ray.util.metrics import Gauge

        self.tags = {"run": run}
        self.gauges = {
            key: Gauge(f"gap3d_train_{key}", description=text, tag_keys=("run",)) for key, text in self.NAMES.items()
        }

    def record(self, metrics: dict) -> None:
        for key, gauge in self.gauges.items():
            gauge.set(float(metrics[key]), tags=self.tags)


def _evaluate(
    config: Gap3DConfig, ema: EMA, prompt_encoder: PromptEncoder | None, eval_set: EvalSet, device: torch.device
) -> dict:
    """Held-out alignment metrics of the EMA weights."""
    aligner = build_aligner(config).to(device)
    aligner.load_state_dict(ema.split("aligner"))
    encoder = with_soft_tokens(prompt_encoder, ema.shadow["soft_tokens"]) if prompt_encoder is not None else None
    cond = evaluation_condition(eval_set.batch, encoder, device)
    return evaluate_alignment(aligner, cond, eval_set, config.flow, seed=config.train.seed)


def _save_and_report(
    engine,
    ema: EMA,
    generator: torch.Generator,
    progress: dict,
    metrics: dict,
    evals: list[dict],
    job: WorkerJob,
    rank: int,
) -> None:
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
    torch.distributed.all_gather_object(
        writers, {"rank": rank, "node": ray.get_runtime_context().get_node_id(), "files": files}
    )
    if rank != 0:
        torch.distributed.barrier()  # rank 0 writes the record before anyone reports
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=checkpoint_dir_name(step))
        return
    job.run.write_record(step, writers)
    job.run.prune(step, job.config.train.keep_checkpoints)
    torch.distributed.barrier()
    with tempfile.TemporaryDirectory(prefix="gap3d-pointer-") as pointer:
        (Path(pointer) / POINTER_NAME).write_text(json.dumps({"step": step, "uri": job.run.checkpoint_uri(step)}))
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(pointer),
            checkpoint_dir_name=checkpoint_dir_name(step),
        )


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


def _restore(
    engine, scheduler, ema: EMA, generator: torch.Generator, rank: int, job: WorkerJob
) -> tuple[dict, list[dict]] | None:
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
