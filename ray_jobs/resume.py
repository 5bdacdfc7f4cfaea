"""What a rerun of the training job resumes from, and which config changes it may bring: decided on the driver,
before any worker starts.

A rerun with the same --storage and --name continues from the run's newest checkpoint that matches its completion
record (ray_jobs/run_checkpoints.py). Its resolved config is compared with the config.yaml saved beside that checkpoint,
key by key:
- Schedule keys (train.lr, min_lr, warmup_ratio, max_steps, soft_token_lr_scale) apply from the checkpoint on:
  the LR continues from the factor on train.lr the run had reached, along a cosine down to the new train.min_lr at
  the new train.max_steps (gap3d.training.LRContinuation). A changed train.lr therefore rescales the LR at once,
  a longer train.max_steps stretches only what is left of the decay.
- Cadence, retention, EMA decay, clipping, weight decay and resources apply from the checkpoint on as they are.
- Every other key fails the run, naming it: shapes and encoders (the checkpoint's weights would not fit or mean
  something else), train.global_batch_size, grad_accum_steps and seed, scaling.num_workers and
  shuffle_buffer_rows (each rank's position in the data order depends on them), scaling.zero_stage (the optimiser
  state is partitioned by it), train.precision; so does training data other than the checkpoint's.
Every applied change is logged as `key: old -> new`. A train.max_steps below the checkpoint's step fails; equal
to it, the run is complete and the job says so.
"""

import dataclasses
import hashlib
import json
import logging
import posixpath

import yaml

from gap3d.checkpoints import read_json, read_text
from gap3d.config import Gap3DConfig, config_to_dict
from gap3d.features.store import feature_files, read_manifest
from gap3d.training import LRContinuation, lr_multiplier
from ray_jobs.run_checkpoints import RunStorage

logger = logging.getLogger("gap3d.train")

SCHEDULE_KEYS = frozenset(
    {"train.lr", "train.min_lr", "train.warmup_ratio", "train.max_steps", "train.soft_token_lr_scale"}
)
FREE_KEYS = frozenset(
    {
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.eval_every",
        "train.eval_samples",
        "train.log_every",
        "train.ema_decay",
        "train.grad_clip",
        "train.weight_decay",
        "scaling.use_gpu",
        "scaling.worker_cpus",
        "scaling.gradient_checkpointing",
        "scaling.materialize_features",
    }
)


@dataclasses.dataclass(frozen=True)
class ResumePlan:
    """Where a rerun starts: the checkpoint it resumes from (None for a new run) and the LR curve it follows."""

    checkpoint: str | None  # URI of the newest checkpoint of the run that matches its completion record
    step: int  # that checkpoint's step (0 for a new run)
    lr_continuation: LRContinuation | None  # set once a resume changed the schedule; carried to later resumes


def data_identity(features: str | None, stream: str | None) -> str:
    """A fingerprint of the training data: the feature files (names and sizes) a run reads, or the raw-shard URI."""
    if features is None:
        return f"stream:{stream}"
    sizes = {
        name: size for entry in read_manifest(features).shards.values() for name, size in entry.get("files", {}).items()
    }
    used = sorted(posixpath.basename(uri) for uri in feature_files(features))
    return (
        "features:" + hashlib.sha256(json.dumps([[name, sizes.get(name)] for name in used]).encode()).hexdigest()[:16]
    )


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict, current: dict) -> dict[str, tuple]:
    """Dotted key -> (saved value, current value) for every key whose value differs."""
    before, after = _flatten(saved), _flatten(current)
    return {
        key: (before.get(key), after.get(key))
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key)
    }


def plan_resume(run: RunStorage, config: Gap3DConfig, scaling, data: str) -> ResumePlan:
    """Compare the rerun's config and data with the newest valid checkpoint's -> the plan; ValueError on a change
    that cannot apply. Newer checkpoints that do not match their records are set aside (ray_jobs/run_checkpoints.py)."""
    step = run.newest_valid(set_aside=True)
    if step is None:
        return ResumePlan(None, 0, None)
    checkpoint = run.checkpoint_uri(step)
    progress = read_json(checkpoint, "progress.json")
    saved = yaml.safe_load(read_text(checkpoint, "config.yaml"))
    changes = config_changes(saved, config_to_dict(config, {"scaling": scaling}))
    fixed = [key for key in changes if key not in SCHEDULE_KEYS | FREE_KEYS]
    if fixed:
        listed = "; ".join(f"{key}: {changes[key][0]!r} -> {changes[key][1]!r}" for key in fixed)
        raise ValueError(
            f"cannot resume {checkpoint} with changed {listed}. These fix the checkpoint's weights or data position; "
            "restore them, or start a new run with another --name"
        )
    if progress.get("data", data) != data:
        raise ValueError(
            f"cannot resume {checkpoint}: the training data differ from those it was trained on ({progress['data']}, "
            f"now {data}); start a new run with another --name"
        )
    if config.train.max_steps < step:
        raise ValueError(
            f"train.max_steps={config.train.max_steps} is below step {step} of {checkpoint}; raise it to train on, or "
            "evaluate that checkpoint"
        )
    saved_continuation = LRContinuation(**progress["lr_continuation"]) if progress.get("lr_continuation") else None
    continuation = saved_continuation
    if changes.keys() & SCHEDULE_KEYS:
        saved_train = dataclasses.replace(
            config.train, **{key[len("train.") :]: changes[key][0] for key in changes.keys() & SCHEDULE_KEYS}
        )
        continuation = LRContinuation(step, lr_multiplier(step, saved_train, saved_continuation))
    for key, (before, after) in changes.items():
        logger.info("resuming %s with %s: %r -> %r", checkpoint, key, before, after)
    if continuation is not saved_continuation:
        logger.info(
            "LR from step %d: %.3g x train.lr, cosine down to train.min_lr=%g at step %d",
            step,
            continuation.start_multiplier,
            config.train.min_lr,
            config.train.max_steps,
        )
    if config.train.max_steps == step:
        logger.info("%s is at train.max_steps=%d already: nothing to train", checkpoint, step)
    return ResumePlan(checkpoint, step, continuation)
