"""Train the aligner (and soft tokens) with Ray Train + DeepSpeed.

    python ray_jobs/train.py --features s3://bucket/features/train --storage s3://bucket/runs [--preset tiny] [key=value
    ...]
    ray job submit --working-dir . -- python ray_jobs/train.py ...

Each Ray Train worker wraps the trainable parts in DeepSpeed (ZeRO stage scaling.zero_stage), reads its shard
of the feature rows through `ray.train.get_dataset_shard("train")`, and every train.checkpoint_every steps
every rank saves its DeepSpeed state and uploads it into `<storage>/<name>/checkpoint_<step>`; rank 0 adds the
EMA weights, an inference export (`export/`), the resolved config and the data position (ray_jobs/train_worker.py),
and last the completion record that makes the checkpoint count (ray_jobs/run_checkpoints.py). Rerunning the same
command resumes from the newest checkpoint that matches its record, chosen and verified here before any worker starts.

Ray Train sees only its public interface: each submission is a fit of its own (`<storage>/<name>/ray_train/<fit>`),
which gets the chosen checkpoint through its train_loop_config, as Ray's V2 guide for resuming from a checkpoint of
one's own choosing says; within the fit, workers report a pointer to each verified checkpoint, which
`ray.train.get_checkpoint()` hands back when Ray restarts the worker group (ray_jobs/train_worker.py).
"""

import argparse
import json
import logging
import secrets
import sys
import time
from dataclasses import dataclass

import ray
import ray.train
from ray.data import ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from gap3d import storage as gap3d_storage
from gap3d.build import derive_shapes
from gap3d.config import Gap3DConfig
from gap3d.evaluation import load_eval_set, read_vocabulary
from gap3d.features.identity import check_compatible, expected_manifest
from gap3d.features.store import check_features, count_rows, feature_files
from ray_jobs.config import add_config_arguments, configure_logging, job_config_from_args
from ray_jobs.nodes import check_storage_is_shared, remove_stale_staging_everywhere
from ray_jobs.pipeline import ENCODE_SECTION, EncodeResources, stream_features
from ray_jobs.resume import data_identity, plan_resume
from ray_jobs.run_checkpoints import RunStorage
from ray_jobs.train_worker import WorkerJob, reported_checkpoint, train_worker

logger = logging.getLogger("gap3d.train")

RAY_TRAIN_DIR = "ray_train"  # under the run directory: one Ray Train run per submission (its own bookkeeping)


@dataclass
class TrainScaling:
    """How the recipe runs on Ray (the `scaling:` config section): workers, devices, DeepSpeed wrapping, data
    loading."""

    num_workers: int = 8  # Ray Train workers (one per GPU)
    use_gpu: bool = True  # give each worker a GPU
    worker_cpus: float = 1.0  # CPUs reserved per worker (fractional on small machines)
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0-3 (authors: 1 in stage 1, 2 in stage 2)
    gradient_checkpointing: bool = True  # recompute aligner blocks in backward to save memory
    shuffle_buffer_rows: int = 256  # Ray Data local shuffle buffer per worker (0 = read order)
    materialize_features: bool = False  # hold the feature rows in Ray's object store across epochs (small data sets)

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"scaling.zero_stage must be 0-3, got {self.zero_stage}")
        if self.num_workers < 1:
            raise ValueError(f"scaling.num_workers must be >= 1, got {self.num_workers}")


# Per preset: 8 GPUs for the paper recipe; two half-CPU workers on a 2-core machine for tiny.
SCALING_PRESETS = {
    "tiny": TrainScaling(
        num_workers=2,
        use_gpu=False,
        worker_cpus=0.5,
        gradient_checkpointing=False,
        shuffle_buffer_rows=64,
        materialize_features=True,
    ),
    "paper": TrainScaling(),
}
TRAIN_SECTIONS = {"scaling": (TrainScaling, SCALING_PRESETS), **ENCODE_SECTION}


def check_start(config: Gap3DConfig, scaling: TrainScaling, features: str | None, stream: str | None):
    """Fail before any worker starts when inputs or config cannot work; returns the feature manifest."""
    if (features is None) == (stream is None):
        raise ValueError(
            "give exactly one of --features URI (preprocessed feature Parquet) or --stream URI (raw shards)"
        )
    per_step = scaling.num_workers * config.train.grad_accum_steps
    if config.train.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size {config.train.global_batch_size} is not divisible by scaling.num_workers x "
            f"train.grad_accum_steps = {per_step}"
        )
    if features is None:
        manifest = expected_manifest(config)
        check_compatible(manifest, config)
        return manifest
    manifest = check_features(features, config)
    rows = count_rows(features)
    if rows < config.train.global_batch_size:
        raise ValueError(
            f"features at {features} hold {rows} rows, fewer than one global batch "
            f"(train.global_batch_size={config.train.global_batch_size})"
        )
    return manifest


def build_dataset(scaling: TrainScaling, features: str) -> ray.data.Dataset:
    """The Ray Dataset of preprocessed feature rows."""
    filesystem, _ = gap3d_storage.arrow_filesystem(features)
    paths = [gap3d_storage.arrow_filesystem(path)[1] for path in feature_files(features)]
    dataset = ray.data.read_parquet(paths, filesystem=filesystem)
    # Rows in file order, whatever finishes first, so that a resumed run sees the order it stopped in.
    dataset.context.execution_options.preserve_order = True
    # Each epoch otherwise re-reads the Parquet files: seconds per epoch, which dominates small runs.
    return dataset.materialize() if scaling.materialize_features else dataset


def data_config(features: str | None) -> DataConfig:
    """How Ray Train splits the rows: in a fixed order for preprocessed features, so every rank's stream is the
    same in every run (the split hands each block to the rank with the fewest rows so far, ignoring locality)."""
    if features is None:
        return DataConfig()  # encoded on the fly: the actor pool's completion order decides, so resume is approximate
    return DataConfig(execution_options=ExecutionOptions(preserve_order=True), enable_shard_locality=False)


def run_training(
    config: Gap3DConfig,
    scaling: TrainScaling,
    storage: str,
    features: str | None = None,
    stream: str | None = None,
    eval_features: str | None = None,
    name: str = "gap3d-train",
    max_failures: int = 0,
    encode: EncodeResources | None = None,
    attributes: str | None = None,
) -> ray.train.Result:
    """Train with TorchTrainer; rerunning with the same storage and name resumes from the newest valid checkpoint."""
    config = derive_shapes(config)
    manifest = check_start(config, scaling, features, stream)
    check_storage_is_shared(storage, "--storage")
    data = data_identity(features, stream)
    storage_fs, storage_path = gap3d_storage.arrow_filesystem(storage)
    run = RunStorage(storage_fs, gap3d_storage.join(storage_path, name), gap3d_storage.join(storage, name))
    plan = plan_resume(run, config, scaling, data)
    remove_stale_staging_everywhere()
    vocabulary = read_vocabulary(attributes) if attributes else None
    eval_set = (
        load_eval_set(eval_features, config, config.train.eval_samples, features, vocabulary) if eval_features else None
    )
    dataset = (
        build_dataset(scaling, features)
        if features
        else stream_features(config, encode or ENCODE_SECTION["encode"][1][config.preset], stream)
    )
    resume_step = plan.step if plan.checkpoint is not None else None
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "job": WorkerJob(config, scaling, manifest, eval_set, data, plan.lr_continuation, run, resume_step)
        },
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.worker_cpus, **({"GPU": 1} if scaling.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=fit_name(),
            storage_path=gap3d_storage.join(run.path, RAY_TRAIN_DIR),
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=max_failures),
            # Ray keeps only pointers to our checkpoints (retention of those is train.keep_checkpoints).
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
        datasets={"train": dataset},
        dataset_config=data_config(features),
    )
    return trainer.fit()


def fit_name() -> str:
    """A new Ray Train run name for each submission, so no Ray bookkeeping of an earlier one is restored."""
    return f"fit-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


def trained_checkpoint(result: ray.train.Result, storage: str) -> str | None:
    """URI, with --storage's scheme, of the newest checkpoint the fit wrote (what evaluate.py takes)."""
    uri = reported_checkpoint(result.checkpoint)
    return None if uri is None else gap3d_storage.with_scheme(storage, uri)


def result_summary(result: ray.train.Result, storage: str) -> dict:
    """The job's JSON result: the newest checkpoint and its metrics."""
    return {"checkpoint": trained_checkpoint(result, storage), "metrics": result.metrics}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train", description="Train the GAP3D aligner with Ray Train + DeepSpeed.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--features", help="feature Parquet directory written by ray_jobs/preprocess.py (local or s3://)"
    )
    source.add_argument("--stream", help="raw image-caption shards, encoded on the fly by Ray Data actor pools")
    parser.add_argument("--storage", required=True, help="RunConfig storage_path for checkpoints (local dir or s3://)")
    parser.add_argument(
        "--name", default="gap3d-train", help="run name under --storage; rerun with the same name to resume"
    )
    parser.add_argument(
        "--eval-features", default=None, help="held-out feature directory evaluated every train.eval_every steps"
    )
    parser.add_argument(
        "--max-failures", type=int, default=2, help="worker-group restarts from the last checkpoint before giving up"
    )
    parser.add_argument(
        "--attributes",
        default=None,
        help="JSON file whose `attributes` maps each attribute the captions name to its values "
        "(the synthetic world's synth.json): periodic evals then report attribute accuracy",
    )
    add_config_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    config, sections = job_config_from_args(args, TRAIN_SECTIONS)
    result = run_training(
        config,
        sections["scaling"],
        args.storage,
        features=args.features,
        stream=args.stream,
        eval_features=args.eval_features,
        name=args.name,
        max_failures=args.max_failures,
        encode=sections["encode"],
        attributes=args.attributes,
    )
    sys.stdout.write(json.dumps(result_summary(result, args.storage), default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
