"""Configs: every section of the library's config tree, and how a run resolves it.

A run resolves one tree from a named preset (gap3d/presets.py), a YAML file and `key.sub=value` overrides, in
that order; unknown keys and wrongly typed values fail with a message naming the key. `Gap3DConfig` composes
the library's sections (VLM, DINOv2, aligner, flow matching, the training recipe, data rules) and is what
every export and checkpoint records. Ray resources (workers, actor pools, Serve limits) are sections of the
jobs that use them (ray_jobs/, serve/), resolved from the same file and overrides by `load_job_config`.

This module is a leaf: reading a config imports no model code, torch or pyarrow. The aligner's token and
condition shapes are not stated here: the encoders determine them, and gap3d.build.derive_shapes fills them in.
"""

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gap3d.presets import DEFAULT_PRESET, PRESETS


@dataclass
class PromptEncoderConfig:
    """The frozen VLM and its soft tokens (gap3d/prompt_encoder.py)."""

    # A transformers VLM checkpoint: hub name (org/name[@revision]), local dir, s3:// URI or registered scheme (tiny://).
    path: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    prompt_template: str = "Please generate image based on the following caption: {caption}"  # authors' wording
    num_soft_tokens: int = 64  # s: learnable query tokens appended after the prompt
    trainable: bool = True  # train the soft tokens (through the frozen VLM) or keep them fixed
    max_prompt_tokens: int = 256  # longer prompts are rejected with an error rather than silently cut
    init_seed: int = 0  # seeds the soft tokens' initial values, so frozen soft tokens are reproducible
    init_scale: float = 1.0  # spread of the initial soft tokens around the mean embedding, in vocabulary stds
    dtype: str = "auto"  # "auto" = bf16 on CUDA, fp32 on CPU

    def __post_init__(self):
        if self.num_soft_tokens < 1:
            raise ValueError(f"vlm.num_soft_tokens must be >= 1, got {self.num_soft_tokens}")
        if "{caption}" not in self.prompt_template:
            raise ValueError(f"vlm.prompt_template must contain '{{caption}}', got {self.prompt_template!r}")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"vlm.max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.init_scale < 0:
            raise ValueError(f"vlm.init_scale must be >= 0, got {self.init_scale}")


@dataclass
class DinoConfig:
    """The DINOv2 target encoder (gap3d/dino.py)."""

    # A Dinov2WithRegistersModel checkpoint: hub name, local dir, s3:// URI or registered scheme (tiny://).
    path: str = "facebook/dinov2-with-registers-large"
    image_size: int = 518  # square input side in pixels; tokens = (image_size / patch)^2 + 1 + registers
    dtype: str = "auto"  # "auto" = bf16 on CUDA, fp32 on CPU; or float32 / bfloat16 / float16

    def __post_init__(self):
        if self.image_size <= 0:
            raise ValueError(f"dino.image_size must be positive, got {self.image_size}")


# Aligner fields the encoders determine; None until gap3d.build.derive_shapes fills them in.
DERIVED_SHAPES = ("token_dim", "grid_size", "num_special_tokens", "cond_dim", "num_cond_tokens")


@dataclass
class AlignerConfig:
    """The AlignerDiT (gap3d/aligner.py). Defaults are the authors' paper-size DiT."""

    hidden_size: int = 1792  # transformer width
    depth: int = 24  # number of blocks
    num_heads: int = 28  # attention heads (head dim = hidden_size / num_heads, must be divisible by 4 for 2-D RoPE)
    mlp_ratio: float = 4.0  # SwiGLU hidden = 2/3 * mlp_ratio * hidden_size, rounded up to a multiple of 64
    qk_norm: bool = True  # RMS-normalise queries and keys (stabilises bf16 training)
    null_condition: str = "zeros"  # CFG null condition: "zeros" (authors) or "learned"
    rope_theta: float = 10000.0  # base of the rotary frequencies
    # Starting value of the cross-attention gates: 0 (closed, Lumina-Next) is the authors' value; a closed gate gives
    # the condition no gradient until it opens, which at tiny scale costs most of a CPU run (docs/miniature.md).
    cross_gate_init: float = 0.0
    pooled_condition: bool = True  # add the condition's mean to the timestep embedding that drives adaLN
    # Also add DiT's fixed 2-D sin-cos embedding to the patch tokens; not in the authors' DiT (RoPE only).
    absolute_positions: bool = False
    # Derived from the encoders (gap3d.build.derive_shapes), recorded in every export; never set in a preset.
    token_dim: int | None = None  # D: DINOv2 hidden size
    grid_size: int | None = None  # patch grid side: dino.image_size / DINOv2 patch size
    num_special_tokens: int | None = None  # CLS + DINOv2 registers, placed before the patches
    cond_dim: int | None = None  # d_vlm: the VLM's hidden size
    num_cond_tokens: int | None = None  # s: vlm.num_soft_tokens

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"aligner.hidden_size {self.hidden_size} is not divisible by aligner.num_heads {self.num_heads}"
            )
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"aligner head dim {self.hidden_size // self.num_heads} must be divisible by 4 for 2-D RoPE"
            )
        if self.null_condition not in ("zeros", "learned"):
            raise ValueError(f"aligner.null_condition must be 'zeros' or 'learned', got {self.null_condition!r}")
        if self.depth < 1:
            raise ValueError(f"aligner.depth must be >= 1, got {self.depth}")
        for name in DERIVED_SHAPES:
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (0 if name == "num_special_tokens" else 1)
            ):
                raise ValueError(f"aligner.{name} must be a positive integer, got {value!r}")

    @property
    def shapes_derived(self) -> bool:
        return all(getattr(self, name) is not None for name in DERIVED_SHAPES)

    @property
    def num_tokens(self) -> int:
        """N: special tokens + grid^2 patches."""
        return self.num_special_tokens + self.grid_size**2


@dataclass
class FlowConfig:
    """Flow matching and sampling (gap3d/flow.py)."""

    time_schedule: str = "uniform"  # training t distribution: "uniform" (authors) or "logit_normal"
    logit_normal_mean: float = 0.0  # mean of the normal before the sigmoid (logit_normal only)
    logit_normal_std: float = 1.0  # std of the normal before the sigmoid (logit_normal only)
    cond_dropout: float = 0.1  # probability of replacing the condition by the null condition (CFG training)
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {"patches": 0.4, "cls": 0.3, "registers": 0.3}
    )  # per-group MSE weights
    solver: str = "euler"  # sampler: "euler" or "heun"
    sample_steps: int = 30  # integration steps from t=1 to t=0
    cfg_scale: float = 3.0  # classifier-free guidance scale (1.0 = no guidance)

    def __post_init__(self):
        if self.time_schedule not in ("uniform", "logit_normal"):
            raise ValueError(f"flow.time_schedule must be 'uniform' or 'logit_normal', got {self.time_schedule!r}")
        if self.solver not in ("euler", "heun"):
            raise ValueError(f"flow.solver must be 'euler' or 'heun', got {self.solver!r}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"flow.cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if self.sample_steps < 1:
            raise ValueError(f"flow.sample_steps must be >= 1, got {self.sample_steps}")
        if set(self.loss_weights) != {"patches", "cls", "registers"}:
            raise ValueError(
                f"flow.loss_weights needs exactly the keys patches, cls, registers; got {sorted(self.loss_weights)}"
            )


@dataclass
class TrainConfig:
    """The optimisation recipe (authors' values; gap3d/training.py); how many workers run it is the job's business."""

    global_batch_size: int = 128  # samples per optimiser step across all workers (authors: 16 per GPU x 8)
    grad_accum_steps: int = 1  # micro-batches per optimiser step on each worker
    lr: float = 2.8e-4  # peak AdamW learning rate
    soft_token_lr_scale: float = (
        1.0  # the soft tokens' learning rate as a multiple of train.lr (authors: one lr for all)
    )
    min_lr: float = 1e-5  # end of the cosine decay
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_ratio: float = 0.003  # fraction of max_steps spent in linear warmup
    max_steps: int = 100_000  # optimiser steps
    grad_clip: float = 1.0  # max global grad norm (0 disables)
    ema_decay: float = 0.9999  # EMA of aligner weights, used for evaluation and export
    precision: str = "bf16"  # "bf16" or "fp32"
    checkpoint_every: int = 1000  # steps between checkpoints
    keep_checkpoints: int = 3  # newest checkpoints kept in storage
    eval_every: int = 5000  # steps between held-out evaluations
    eval_samples: int = 128  # held-out rows evaluated every eval_every steps
    log_every: int = 50  # steps between progress lines / metric reports
    seed: int = 0  # seeds data order, noise and dropout

    def __post_init__(self):
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"train.precision must be 'bf16' or 'fp32', got {self.precision!r}")
        for name in (
            "global_batch_size",
            "grad_accum_steps",
            "max_steps",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "eval_every",
            "eval_samples",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.soft_token_lr_scale < 0:
            raise ValueError(f"train.soft_token_lr_scale must be >= 0, got {self.soft_token_lr_scale}")
        if not 0.0 < self.min_lr <= self.lr:
            raise ValueError(f"need 0 < train.min_lr <= train.lr, got {self.min_lr} and {self.lr}")


@dataclass
class DataConfig:
    """Which raw records are usable (gap3d/data/shards.py)."""

    min_image_side: int = 128  # smaller images are skipped as image_too_small

    def __post_init__(self):
        if self.min_image_side < 1:
            raise ValueError(f"data.min_image_side must be >= 1, got {self.min_image_side}")


@dataclass
class Gap3DConfig:
    preset: str  # the preset this config was resolved from
    vlm: PromptEncoderConfig  # frozen VLM + soft tokens
    dino: DinoConfig  # DINOv2 target encoder
    aligner: AlignerConfig  # AlignerDiT
    flow: FlowConfig  # flow matching and sampling
    train: TrainConfig  # optimisation recipe
    data: DataConfig  # which raw records are usable


def build(cls, values: dict, prefix: str = ""):
    """Construct dataclass `cls` from a nested dict, rejecting unknown keys by their dotted name."""
    if not isinstance(values, dict):
        raise ValueError(f"config key {prefix.rstrip('.') or '<root>'} needs a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]}; valid keys here: {', '.join(sorted(names))}")
    # A section left out takes its dataclass defaults.
    values = {
        **{
            f.name: {}
            for f in dataclasses.fields(cls)
            if dataclasses.is_dataclass(hints[f.name]) and f.name not in values
        },
        **values,
    }
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        kwargs[name] = (
            build(hint, value, f"{prefix}{name}.")
            if dataclasses.is_dataclass(hint)
            else _coerce(hint, value, prefix + name)
        )
    try:
        return cls(**kwargs)
    except TypeError as error:  # a required field is missing
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'}: {error}") from None


def _coerce(hint, value, key: str):
    """Convert scalars to the field's type (YAML reads 1e-4 as a string, 1 as an int for a float field)."""
    optional = typing.get_args(hint)
    if type(None) in optional:  # `X | None`: None stays None, anything else converts to X
        return None if value is None else _coerce(next(arg for arg in optional if arg is not type(None)), value, key)
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"config key {key} needs a number, got {value!r}") from None
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
            raise ValueError(f"config key {key} needs an integer, got {value!r}")
        return int(value)
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"config key {key} needs true or false, got {value!r}")
    return value


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; `update` wins."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = (
            merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def override_to_dict(override: str) -> dict:
    """'train.lr=1e-4' -> {'train': {'lr': 1e-4}} (value parsed as YAML)."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {override!r} must look like key.sub=value")
    value = yaml.safe_load(raw) if raw else ""
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def _section_dict(cls, presets: dict, preset: str) -> dict:
    """Dataclass `cls`'s values in `preset` (a dict or a dataclass instance per preset name)."""
    chosen = presets.get(preset, {})
    return dataclasses.asdict(chosen) if dataclasses.is_dataclass(chosen) else dict(chosen)


def load_job_config(
    preset: str | None = None,
    yaml_path: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    sections: dict[str, tuple[type, dict]] | None = None,
) -> tuple[Gap3DConfig, dict[str, typing.Any]]:
    """Resolve preset -> YAML -> overrides into Gap3DConfig plus the job's own `sections`
    {name: (dataclass, presets)}."""
    sections = sections or {}
    from_file = (yaml.safe_load(Path(yaml_path).read_text()) or {}) if yaml_path else {}
    preset = preset or from_file.get("preset") or DEFAULT_PRESET
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = merge(PRESETS[preset], {key: value for key, value in from_file.items() if key != "preset"})
    for name, (cls, presets) in sections.items():
        values[name] = merge(_section_dict(cls, presets, preset), values.get(name, {}))
    for override in overrides:
        values = merge(values, override_to_dict(override))
    job = {name: build(cls, values.pop(name), f"{name}.") for name, (cls, _) in sections.items()}
    return build(Gap3DConfig, {**values, "preset": preset}), job


def load_config(
    preset: str | None = None, yaml_path: str | Path | None = None, overrides: typing.Sequence[str] = ()
) -> Gap3DConfig:
    """Resolve preset -> YAML -> overrides into a validated Gap3DConfig."""
    return load_job_config(preset, yaml_path, overrides)[0]


def config_to_dict(config, sections: dict | None = None) -> dict:
    """Plain nested dict of a config, plus job sections at the top level (YAML/JSON serialisable)."""
    values = dataclasses.asdict(config)
    values.update({name: dataclasses.asdict(section) for name, section in (sections or {}).items()})
    return values


def save_config(config, path: str | Path, sections: dict | None = None) -> None:
    """Write the resolved config (and job sections) as YAML that load_job_config reads back."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config, sections), sort_keys=False))
