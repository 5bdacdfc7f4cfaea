"""Feature shards: the Parquet rows preprocessing writes and training reads.

One row per image-text pair:
    key            string
    caption        string
    input_ids      list<int32>          the VLM prompt tokens (chat template applied)
    dino           list<float16>        DINOv2 target, (N, D) flattened row-major; N, D in the manifest
    next_position  int32                position id of the first soft token
and, by soft-token mode:
    "prompt_cache" (soft tokens train):  prompt_cache list<float16> = (layers, 2, kv_heads, L, head_dim)
                                         flattened, L = len(input_ids); other dims in the manifest
    "soft_latents" (soft tokens frozen): soft_latents list<float16> = (s, d_vlm) flattened
Flat lists keep the files readable by any Parquet reader; shapes live once, in manifest.json.
"""

import dataclasses
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from gap3d.config import Gap3DConfig
from gap3d.prompt_encoder import PromptCache

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


def soft_token_mode(config: Gap3DConfig) -> str:
    """"prompt_cache" when the soft tokens train, "soft_latents" when they are frozen."""
    return "prompt_cache" if config.vlm.trainable else "soft_latents"


def encoder_identity(config: Gap3DConfig) -> dict:
    """What features depend on; training refuses features whose identity differs from its config's."""
    identity = {
        "vlm_path": config.vlm.path,
        "prompt_template": config.vlm.prompt_template,
        "dino_path": config.dino.path,
        "dino_image_size": config.dino.image_size,
        "soft_token_mode": soft_token_mode(config),
    }
    if not config.vlm.trainable:
        identity.update(num_soft_tokens=config.vlm.num_soft_tokens, soft_token_init_seed=config.vlm.init_seed)
    return identity


@dataclass
class FeatureManifest:
    """manifest.json beside the feature shards."""

    encoders: dict  # encoder_identity() of the config that wrote the features
    dino_shape: list[int]  # [N, D]
    cache_shape: list[int] | None = None  # [layers, 2, kv_heads, head_dim] in prompt_cache mode
    latents_shape: list[int] | None = None  # [s, d_vlm] in soft_latents mode
    shards: dict[str, dict] = field(default_factory=dict)  # output shard name -> {"rows": n, "skipped": {...}}
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FeatureManifest":
        values = json.loads(text)
        if values.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"feature manifest has schema_version {values.get('schema_version')}, this code reads {SCHEMA_VERSION}; re-run preprocessing")
        return cls(**values)

    def check_compatible(self, config: Gap3DConfig) -> None:
        """Raise ValueError naming every encoder setting that differs between these features and `config`."""
        expected = encoder_identity(config)
        differences = [
            f"{key}: features have {self.encoders.get(key)!r}, config has {value!r}"
            for key, value in expected.items()
            if self.encoders.get(key) != value
        ]
        if differences:
            raise ValueError("features were written by different encoders than configured; " + "; ".join(differences))


def feature_schema(mode: str) -> pa.Schema:
    """Arrow schema of a feature shard for soft-token mode `mode`."""
    fields = [
        pa.field("key", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("dino", pa.list_(pa.float16())),
        pa.field("next_position", pa.int32()),
        pa.field(mode, pa.list_(pa.float16())),
    ]
    return pa.schema(fields)


def rows_to_table(rows: dict[str, list], mode: str) -> pa.Table:
    """Column dict (tensors flattened per row) -> Arrow table in the feature schema."""
    schema = feature_schema(mode)
    arrays = {
        name: [np.asarray(value, dtype=np.float16).reshape(-1) for value in rows[name]] if name in ("dino", mode) else rows[name]
        for name in schema.names
    }
    return pa.table(arrays, schema=schema)


def dino_from_rows(flat: list[np.ndarray], manifest: FeatureManifest) -> torch.Tensor:
    """Flattened fp16 DINOv2 targets -> float32 (B, N, D)."""
    stacked = np.stack([np.asarray(row, dtype=np.float16) for row in flat])
    return torch.from_numpy(stacked.astype(np.float32)).view(len(flat), *manifest.dino_shape)


def caches_from_rows(flat: list[np.ndarray], input_ids: list[np.ndarray], next_position: list[int], manifest: FeatureManifest) -> list[PromptCache]:
    """Flattened fp16 prompt caches -> PromptCache objects (float32) for PromptEncoder.soft_latents."""
    layers, two, kv_heads, head_dim = manifest.cache_shape
    return [
        PromptCache(
            key_values=torch.from_numpy(np.asarray(row, dtype=np.float16).astype(np.float32)).view(layers, two, kv_heads, len(ids), head_dim),
            next_position=int(position),
        )
        for row, ids, position in zip(flat, input_ids, next_position)
    ]


def latents_from_rows(flat: list[np.ndarray], manifest: FeatureManifest) -> torch.Tensor:
    """Flattened fp16 soft latents -> float32 (B, s, d_vlm)."""
    stacked = np.stack([np.asarray(row, dtype=np.float16) for row in flat])
    return torch.from_numpy(stacked.astype(np.float32)).view(len(flat), *manifest.latents_shape)
