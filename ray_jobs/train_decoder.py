"""Train TRELLIS stage 1 (sparse-structure VAE, then flow) with Ray Train and write a TRELLIS release.

    python ray_jobs/train_decoder.py --features DIR/train-*.parquet --shards RAW/train-*.tar --storage DIR
    [stage1.key=value ...]

The condition of each object is its render's DINOv2 tokens, read from the feature files the aligner trains on
(the `dino` column); its 3D ground truth is the `<key>.occupancy.npy` the raw shards carry (the synthetic world's,
gap3d.data.occupancy), joined by key. Checkpoints follow the aligner's conventions: every --checkpoint-every
steps and at the end, `<storage>/<name>/checkpoint_<step>/` holds the whole training state (`stage1_state.pt`),
the resolved config (`config.yaml`) and a TRELLIS release of the weights so far (`release/`, what
`Decoder.from_pretrained` and serve/config.yaml's `trellis` load). Rerunning the same command resumes from the
newest checkpoint, and the resumed run is exactly the uninterrupted one. Stage 1 at tiny size is one process's
work, so the job runs one worker; the inputs travel with the train function, which suits data sets that fit in
memory (the tiny world's do: 30 MB).
"""

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from gap3d import storage as gap3d_storage
from gap3d.config import save_config
from gap3d.data.occupancy import downsample, read_occupancy
from gap3d.features.store import load_rows
from gap3d.trellis.stage1_training import Stage1Config, Stage1Trainer
from ray_jobs.config import add_config_arguments, configure_logging, job_config_from_args

logger = logging.getLogger("gap3d.train_decoder")

STATE_NAME = "stage1_state.pt"
RELEASE_NAME = "release"
# TRELLIS's own stage-1 sizes (configs/vae/ss_vae_conv3d_16l8_fp16.json,
# configs/generation/ss_flow_img_dit_L_16l8_fp16.json).
PAPER_STAGE1 = Stage1Config(
    resolution=64,
    vae_channels=[32, 128, 512],
    flow_width=1024,
    flow_blocks=24,
    flow_heads=16,
    patch_size=1,
    vae_steps=1_000_000,
    vae_batch_size=4,
    vae_lr=1e-4,
    flow_steps=1_000_000,
    flow_batch_size=8,
    flow_lr=1e-4,
    ema_decay=0.9999,
)
STAGE1_SECTIONS = {"stage1": (Stage1Config, {"tiny": Stage1Config(), "paper": PAPER_STAGE1})}


def load_inputs(config, stage1: Stage1Config, features: str, shards: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Occupancy bool (N, R, R, R) at stage1.resolution and DINOv2 tokens (N, T, D) of the same rows, joined by key."""
    batch, _, keys = load_rows(features, config)
    grids = read_occupancy(shards, set(keys))
    missing = [key for key in keys if key not in grids]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(keys)} feature rows have no <key>.occupancy.npy in {shards} (e.g. key "
            f"{missing[0]!r}); "
            "pass the raw shards the features were encoded from"
        )
    occupancy = torch.from_numpy(np.stack([downsample(grids[key], stage1.resolution) for key in keys]))
    logger.info(
        "stage 1 inputs: %d objects, occupancy %s, tokens %s",
        len(keys),
        tuple(occupancy.shape),
        tuple(batch.dino.shape),
    )
    return occupancy, batch.dino.float()


def save_checkpoint(trainer: Stage1Trainer, config, stage1: Stage1Config) -> None:
    """Report a checkpoint with the state, the resolved config and a release of the current weights."""
    with tempfile.TemporaryDirectory(prefix="gap3d-stage1-") as directory:
        torch.save(trainer.state_dict(), Path(directory) / STATE_NAME)
        save_config(config, Path(directory) / "config.yaml", {"stage1": stage1})
        trainer.write_release(Path(directory) / RELEASE_NAME)
        losses = trainer.history[-1] if trainer.history else {}
        ray.train.report({"step": trainer.step, **losses}, checkpoint=Checkpoint.from_directory(directory))


def train_decoder_worker(loop_config: dict) -> None:
    """Ray Train function: resume from the newest checkpoint if any, train, checkpoint every `checkpoint_every`
    steps."""
    config, stage1, every = loop_config["config"], loop_config["stage1"], loop_config["checkpoint_every"]
    torch.set_num_threads(max(1, int(loop_config["threads"])))
    trainer = Stage1Trainer(stage1, loop_config["occupancy"], loop_config["tokens"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load_state_dict(torch.load(Path(directory) / STATE_NAME, weights_only=False))
        logger.info(
            "resumed stage-1 training at step %d of %d%s",
            trainer.step,
            trainer.total_steps,
            " (already complete)" if trainer.step >= trainer.total_steps else "",
        )
    while trainer.step < trainer.total_steps:
        trainer.train_step()
        if trainer.step % every == 0 or trainer.step == trainer.total_steps:
            save_checkpoint(trainer, config, stage1)


def run_decoder_training(
    config,
    stage1: Stage1Config,
    features: str,
    shards: str,
    storage: str,
    name: str = "gap3d-decoder",
    checkpoint_every: int = 500,
    max_failures: int = 0,
    worker_cpus: float = 1.0,
) -> ray.train.Result:
    """Train with a one-worker TorchTrainer; rerunning with the same storage and name resumes."""
    if checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be >= 1, got {checkpoint_every}")
    occupancy, tokens = load_inputs(config, stage1, features, shards)
    storage_fs, storage_path = gap3d_storage.arrow_filesystem(storage)
    loop_config = {
        "config": config,
        "stage1": stage1,
        "occupancy": occupancy,
        "tokens": tokens,
        "checkpoint_every": checkpoint_every,
        "threads": max(1, worker_cpus),
    }
    trainer = TorchTrainer(
        train_decoder_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": worker_cpus}),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    return trainer.fit()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train-decoder", description="Train TRELLIS stage 1 with Ray Train and write a TRELLIS release."
    )
    parser.add_argument(
        "--features",
        required=True,
        help="feature Parquet of the training objects (their `dino` tokens), local or s3://",
    )
    parser.add_argument(
        "--shards", required=True, help="raw shards the features came from, with <key>.occupancy.npy members"
    )
    parser.add_argument("--storage", required=True, help="RunConfig storage_path for checkpoints (local dir or s3://)")
    parser.add_argument(
        "--name", default="gap3d-decoder", help="run name under --storage; rerun with the same name to resume"
    )
    parser.add_argument("--checkpoint-every", type=int, default=500, help="optimiser steps between checkpoints")
    parser.add_argument(
        "--max-failures", type=int, default=2, help="worker restarts from the last checkpoint before giving up"
    )
    parser.add_argument(
        "--worker-cpus", type=float, default=1.0, help="CPUs reserved for the worker (its torch threads)"
    )
    add_config_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    config, sections = job_config_from_args(args, STAGE1_SECTIONS)
    result = run_decoder_training(
        config,
        sections["stage1"],
        args.features,
        args.shards,
        args.storage,
        args.name,
        args.checkpoint_every,
        args.max_failures,
        args.worker_cpus,
    )
    checkpoint = (
        gap3d_storage.with_scheme(args.storage, result.checkpoint.path) if result.checkpoint is not None else None
    )
    release = gap3d_storage.join(checkpoint, RELEASE_NAME) if checkpoint else None
    sys.stdout.write(
        json.dumps(
            {
                "checkpoint": checkpoint,
                "release": release,
                "metrics": result.metrics,
                "stage1": asdict(sections["stage1"]),
            },
            default=str,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
