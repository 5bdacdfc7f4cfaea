"""One config tree for every part, loadable from YAML and overridable with `key.sub=value`.

Resolution order: dataclass defaults (the authors' recipe) -> named preset (`tiny`, `paper`) -> YAML file ->
command-line overrides. Model configs live beside their models; this module composes them.
"""

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gap3d import storage
from gap3d.aligner import AlignerConfig
from gap3d.dino import DinoConfig
from gap3d.flow import FlowConfig
from gap3d.prompt_encoder import PromptEncoderConfig


@dataclass
class TrainConfig:
    num_workers: int = 8  # Ray Train workers (one per GPU)
    use_gpu: bool = True  # give each worker a GPU
    global_batch_size: int = 128  # samples per optimiser step across all workers (authors: 16 per GPU)
    grad_accum_steps: int = 1  # micro-batches per optimiser step on each worker
    lr: float = 2.8e-4  # peak AdamW learning rate
    min_lr: float = 1e-5  # end of the cosine decay
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_ratio: float = 0.003  # fraction of max_steps spent in linear warmup
    max_steps: int = 100_000  # optimiser steps
    grad_clip: float = 1.0  # max global grad norm (0 disables)
    ema_decay: float = 0.9999  # EMA of aligner weights, used for evaluation and export
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0-3
    precision: str = "bf16"  # "bf16" or "fp32"
    gradient_checkpointing: bool = True  # recompute aligner blocks in backward to save memory
    checkpoint_every: int = 1000  # steps between checkpoints
    keep_checkpoints: int = 3  # newest checkpoints kept in storage
    eval_every: int = 5000  # steps between held-out evaluations
    seed: int = 0  # seeds data order, noise and dropout
    worker_cpus: float = 1.0  # CPUs reserved per Ray Train worker (fractional on small machines)
    log_every: int = 50  # steps between progress lines / metric reports
    eval_samples: int = 128  # held-out rows evaluated every eval_every steps
    shuffle_buffer_rows: int = 256  # Ray Data local shuffle buffer per worker (0 = read order)
    materialize_features: bool = False  # hold --features rows in Ray's object store across epochs (small data sets)

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"train.zero_stage must be 0-3, got {self.zero_stage}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"train.precision must be 'bf16' or 'fp32', got {self.precision!r}")
        for name in ("num_workers", "global_batch_size", "grad_accum_steps", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.global_batch_size % (self.num_workers * self.grad_accum_steps):
            raise ValueError(
                f"train.global_batch_size {self.global_batch_size} is not divisible by "
                f"train.num_workers x train.grad_accum_steps = {self.num_workers * self.grad_accum_steps}"
            )


@dataclass
class DataConfig:
    min_image_side: int = 128  # smaller images are skipped as image_too_small
    encode_batch_size: int = 32  # rows per encoder actor call
    encoder_pool_min: int = 1  # encoder actor pool size bounds
    encoder_pool_max: int = 8
    encoder_num_gpus: float = 1.0  # GPUs per encoder actor (fractions allowed)
    encoder_num_cpus: float = 0.0  # CPUs per encoder actor (0 for GPU actors; fractional on small machines)
    decode_num_cpus: float = 1.0  # CPUs per decode task

    def __post_init__(self):
        if not 1 <= self.encoder_pool_min <= self.encoder_pool_max:
            raise ValueError(f"need 1 <= data.encoder_pool_min <= data.encoder_pool_max, got {self.encoder_pool_min}, {self.encoder_pool_max}")
        if self.encode_batch_size < 1:
            raise ValueError(f"data.encode_batch_size must be >= 1, got {self.encode_batch_size}")


@dataclass
class ServeConfig:
    max_prompt_chars: int = 2000  # longer prompts are rejected with 422
    max_image_pixels: int = 4096 * 4096  # larger prompt images are rejected with 413
    max_body_bytes: int = 32 * 1024 * 1024  # request body cap
    max_steps: int = 100  # upper bound on requested sampling steps
    max_cfg_scale: float = 20.0  # upper bound on requested guidance scale
    target_faces: int = 50_000  # served meshes are simplified to at most about this many faces
    max_batch_size: int = 8  # Aligner @serve.batch size
    batch_wait_timeout_s: float = 0.02  # Aligner @serve.batch wait

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ValueError(f"serve.max_batch_size must be >= 1, got {self.max_batch_size}")


@dataclass
class Gap3DConfig:
    preset: str = "paper"  # which preset this config was resolved from
    vlm: PromptEncoderConfig = field(default_factory=PromptEncoderConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    aligner: AlignerConfig = field(default_factory=AlignerConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self):
        if self.aligner.num_cond_tokens != self.vlm.num_soft_tokens:
            raise ValueError(
                f"aligner.num_cond_tokens ({self.aligner.num_cond_tokens}) must equal vlm.num_soft_tokens ({self.vlm.num_soft_tokens})"
            )


def tiny_root() -> Path:
    """Where the tiny preset's random checkpoints live."""
    return storage.cache_root() / "tiny"


def _tiny_preset() -> dict:
    root = tiny_root()
    return {
        "vlm": {"path": str(root / "vlm"), "num_soft_tokens": 8, "dtype": "float32"},
        "dino": {"path": str(root / "dino"), "image_size": 224, "dtype": "float32"},
        "aligner": {
            "token_dim": 64, "grid_size": 16, "cond_dim": 64, "num_cond_tokens": 8,
            "hidden_size": 128, "depth": 4, "num_heads": 4, "null_condition": "learned",
        },
        # Uniform t, as the authors train: logit-normal t rarely lands near t = 1, where sampling starts, and a
        # 300-step run then samples far from its targets (token cosine 0.63 against 0.86 with uniform t, both at
        # lr 1e-3; lr 3e-3 reaches 0.93).
        "flow": {"time_schedule": "uniform", "sample_steps": 10, "cfg_scale": 2.0},
        "train": {
            "num_workers": 2, "use_gpu": False, "global_batch_size": 16, "lr": 3e-3, "min_lr": 1e-4,
            "warmup_ratio": 0.05, "max_steps": 300, "ema_decay": 0.99, "precision": "fp32",
            "gradient_checkpointing": False, "checkpoint_every": 100, "eval_every": 100,
            "worker_cpus": 0.5, "log_every": 10, "eval_samples": 64, "shuffle_buffer_rows": 64, "materialize_features": True,
        },
        "data": {
            "min_image_side": 64, "encode_batch_size": 16, "encoder_pool_min": 1, "encoder_pool_max": 1,
            "encoder_num_gpus": 0.0, "encoder_num_cpus": 0.5, "decode_num_cpus": 0.25,
        },
        "serve": {"max_steps": 50},
    }


PRESETS = {"tiny": _tiny_preset, "paper": dict}


def _build(cls, values: dict, prefix: str = ""):
    """Construct dataclass `cls` from a nested dict, rejecting unknown keys by their dotted name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]}; valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        kwargs[name] = _build(hint, value, f"{prefix}{name}.") if dataclasses.is_dataclass(hint) else _coerce(hint, value, prefix + name)
    return cls(**kwargs)


def _coerce(hint, value, key: str):
    """Convert scalars to the field's type (YAML reads 1e-4 as a string, 1 as an int for a float field)."""
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"config key {key} needs a number, got {value!r}") from None
    if hint is int and isinstance(value, str):
        raise ValueError(f"config key {key} needs an integer, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"config key {key} needs true or false, got {value!r}")
    return value


def _merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; `update` wins."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _override_to_dict(override: str) -> dict:
    """'train.lr=1e-4' -> {'train': {'lr': 1e-4}} (value parsed as YAML)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ValueError(f"override {override!r} must look like key.sub=value")
    value = yaml.safe_load(raw) if raw else ""
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def load_config(preset: str | None = None, yaml_path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Gap3DConfig:
    """Resolve defaults -> preset -> YAML -> overrides into a validated Gap3DConfig."""
    from_file = yaml.safe_load(Path(yaml_path).read_text()) or {} if yaml_path else {}
    preset = preset or from_file.get("preset") or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = _merge(PRESETS[preset](), from_file)
    for override in overrides:
        values = _merge(values, _override_to_dict(override))
    values["preset"] = preset
    return _build(Gap3DConfig, values)


def config_to_dict(config: Gap3DConfig) -> dict:
    """Plain nested dict of a config (YAML/JSON serialisable)."""
    return dataclasses.asdict(config)


def save_config(config: Gap3DConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def add_config_arguments(parser) -> None:
    """Add --preset, --config and trailing key.sub=value overrides to an argparse parser."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="size preset (default: tiny, or the YAML's)")
    parser.add_argument("--config", default=None, help="YAML file with config values")
    parser.add_argument("overrides", nargs="*", default=[], help="config overrides such as train.lr=1e-4")


def config_from_args(args) -> Gap3DConfig:
    """The config named by parsed --preset/--config/overrides."""
    return load_config(args.preset, args.config, args.overrides)
