"""Configs: a run resolves one tree from a named preset, a YAML file and `key.sub=value` overrides, in that order.

Section dataclasses live beside the code they configure; `Gap3DConfig` composes the library's (models, flow
matching, the training recipe, data rules) and is what every export and checkpoint records. Ray resources
(workers, actor pools, Serve limits) are sections of the jobs that use them (ray_jobs/, serve/), resolved from
the same file and overrides by `load_job_config`. Presets are sizes, kept in gap3d/presets.py; `tiny` is the
default everywhere. Unknown keys and wrongly typed values fail with a message naming the key.
"""

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from gap3d.aligner import AlignerConfig
from gap3d.data.shards import DataConfig
from gap3d.dino import DinoConfig
from gap3d.flow import FlowConfig
from gap3d.presets import DEFAULT_PRESET, PRESETS
from gap3d.prompt_encoder import PromptEncoderConfig
from gap3d.training import TrainConfig


@dataclass
class Gap3DConfig:
    preset: str  # the preset this config was resolved from
    vlm: PromptEncoderConfig  # frozen VLM + soft tokens (gap3d/prompt_encoder.py)
    dino: DinoConfig  # DINOv2 target encoder (gap3d/dino.py)
    aligner: AlignerConfig  # AlignerDiT shapes (gap3d/aligner.py)
    flow: FlowConfig  # flow matching and sampling (gap3d/flow.py)
    train: TrainConfig  # optimisation recipe (gap3d/training.py)
    data: DataConfig  # which raw records are usable (gap3d/data/shards.py)

    def __post_init__(self):
        if self.aligner.num_cond_tokens != self.vlm.num_soft_tokens:
            raise ValueError(
                f"aligner.num_cond_tokens ({self.aligner.num_cond_tokens}) must equal vlm.num_soft_tokens ({self.vlm.num_soft_tokens})"
            )


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
    values = {**{f.name: {} for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name]) and f.name not in values}, **values}
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        kwargs[name] = build(hint, value, f"{prefix}{name}.") if dataclasses.is_dataclass(hint) else _coerce(hint, value, prefix + name)
    try:
        return cls(**kwargs)
    except TypeError as error:  # a required field is missing
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'}: {error}") from None


def _coerce(hint, value, key: str):
    """Convert scalars to the field's type (YAML reads 1e-4 as a string, 1 as an int for a float field)."""
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
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
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
    """Resolve preset -> YAML -> overrides into Gap3DConfig plus the job's own `sections` {name: (dataclass, presets)}."""
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


def load_config(preset: str | None = None, yaml_path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Gap3DConfig:
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
