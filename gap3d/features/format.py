"""The feature-shard format: Arrow schema, manifest, and rows <-> tensors.

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

from gap3d.prompt_encoder import PromptCache

SCHEMA_VERSION = 3  # 2: chunk files per input shard, listed per shard in `shards`; 3: encoders by content fingerprint
MANIFEST_NAME = "manifest.json"
MODES = ("prompt_cache", "soft_latents")
BASE_COLUMNS = ("key", "caption", "input_ids", "dino", "next_position")


@dataclass
class FeatureManifest:
    """manifest.json beside the feature shards."""

    encoders: dict  # encoder_identity() of the config that wrote the features
    dino_shape: list[int]  # [N, D]
    cache_shape: list[int] | None = None  # [layers, 2, kv_heads, head_dim] in prompt_cache mode
    latents_shape: list[int] | None = None  # [s, d_vlm] in soft_latents mode
    shards: dict[str, dict] = field(
        default_factory=dict
    )  # input shard stem -> completion record ({"files": [...], "rows": n, ...})
    totals: dict = field(
        default_factory=dict
    )  # over all shards, from every run: {"rows_in", "rows", "skipped": {reason: n}}
    schema_version: int = SCHEMA_VERSION

    @property
    def mode(self) -> str:
        return "prompt_cache" if self.cache_shape is not None else "soft_latents"

    def count_totals(self) -> None:
        """Set `totals` from the shard records."""
        skipped: dict[str, int] = {}
        for record in self.shards.values():
            for reason, count in record.get("skipped", {}).items():
                skipped[reason] = skipped.get(reason, 0) + count
        rows_in = sum(record.get("rows_in", 0) for record in self.shards.values())
        self.totals = {
            "rows_in": rows_in,
            "rows": sum(record.get("rows", 0) for record in self.shards.values()),
            "skipped": dict(sorted(skipped.items())),
        }

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> "FeatureManifest":
        values = json.loads(text)
        if values.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"{where} has schema_version {values.get('schema_version')}, this code reads {SCHEMA_VERSION}; re-run "
                "preprocessing"
            )
        return cls(**values)


def feature_schema(mode: str) -> pa.Schema:
    """Arrow schema of a feature shard for soft-token mode `mode`."""
    if mode not in MODES:
        raise ValueError(f"soft-token mode must be one of {MODES}, got {mode!r}")
    return pa.schema(
        [
            pa.field("key", pa.string()),
            pa.field("caption", pa.string()),
            pa.field("input_ids", pa.list_(pa.int32())),
            pa.field("dino", pa.list_(pa.float16())),
            pa.field("next_position", pa.int32()),
            pa.field(mode, pa.list_(pa.float16())),
        ]
    )


def rows_to_table(rows: dict[str, list], mode: str) -> pa.Table:
    """Column dict (one tensor or value per row) -> Arrow table in the feature schema, tensors flattened to fp16."""
    schema = feature_schema(mode)
    arrays = {
        name: [np.asarray(value, dtype=np.float16).reshape(-1) for value in rows[name]]
        if name in ("dino", mode)
        else rows[name]
        for name in schema.names
    }
    return pa.table(arrays, schema=schema)


def empty_table(mode: str) -> pa.Table:
    """A feature table with no rows."""
    return feature_schema(mode).empty_table()


@dataclass
class FeatureBatch:
    """Feature rows as tensors: what a training step or an evaluation consumes."""

    dino: torch.Tensor  # (B, N, D) DINOv2 targets
    caches: list[PromptCache] | None = None  # prompt caches, when the soft tokens train
    latents: torch.Tensor | None = None  # (B, s, d_vlm) stored soft-token latents, when they are frozen

    def __len__(self) -> int:
        return self.dino.shape[0]

    def to(self, device: torch.device, dtype: torch.dtype, cache_dtype: torch.dtype | None = None) -> "FeatureBatch":
        """Move to `device`; targets and latents take `dtype`, prompt caches `cache_dtype` (the VLM's; default
        `dtype`)."""
        cache_dtype = cache_dtype or dtype
        caches = (
            None
            if self.caches is None
            else [PromptCache(c.key_values.to(device, cache_dtype), c.next_position) for c in self.caches]
        )
        latents = None if self.latents is None else self.latents.to(device, dtype)
        return FeatureBatch(self.dino.to(device, dtype), caches, latents)


def _stack_fp16(flat: list) -> np.ndarray:
    return np.stack([np.asarray(row, dtype=np.float16) for row in flat]).astype(np.float32)


def batch_from_rows(rows: dict, manifest: FeatureManifest) -> FeatureBatch:
    """Feature rows (column -> sequence of per-row values) -> FeatureBatch on CPU, float32."""
    count = len(rows["dino"])
    dino = torch.from_numpy(_stack_fp16(list(rows["dino"]))).view(count, *manifest.dino_shape)  # (B, N, D)
    if manifest.mode == "soft_latents":
        latents = torch.from_numpy(_stack_fp16(list(rows["soft_latents"]))).view(
            count, *manifest.latents_shape
        )  # (B, s, d_vlm)
        return FeatureBatch(dino=dino, latents=latents)
    layers, two, kv_heads, head_dim = manifest.cache_shape
    caches = [
        PromptCache(
            key_values=torch.from_numpy(np.asarray(flat, dtype=np.float16).astype(np.float32)).view(
                layers, two, kv_heads, len(ids), head_dim
            ),
            next_position=int(position),
        )
        for flat, ids, position in zip(rows["prompt_cache"], rows["input_ids"], rows["next_position"])
    ]
    return FeatureBatch(dino=dino, caches=caches)


class RowCollator:
    """Picklable collate function (for Ray Data): numpy column batch -> FeatureBatch."""

    def __init__(self, manifest: FeatureManifest):
        self.manifest = manifest

    def __call__(self, rows: dict[str, np.ndarray]) -> FeatureBatch:
        return batch_from_rows(rows, self.manifest)
