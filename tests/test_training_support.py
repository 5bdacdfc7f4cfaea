"""Helpers shared by the training tests: feature shards written straight from the tiny encoders.

This builds what ray_jobs/preprocess.py writes (feature Parquet + manifest.json) without Ray, so training
tests do not depend on the preprocessing job: synthetic scenes -> tiny DINOv2 targets + VLM prompt caches.
"""

import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from gap3d import storage
from gap3d.build import build_encoders
from gap3d.config import Gap3DConfig, load_config
from gap3d.data.synth import render_scene, sample_scene
from gap3d.dino import normalize_images
from gap3d.features import MANIFEST_NAME, FeatureManifest, encoder_identity, rows_to_table, soft_token_mode


def encode_rows(config: Gap3DConfig, scenes: list) -> dict[str, list]:
    """Feature rows for `scenes` through the configured (tiny) encoders."""
    prompt_encoder, dino = build_encoders(config)
    captions = [scene.caption for scene in scenes]
    images = np.stack([render_scene(scene, config.dino.image_size) for scene in scenes])
    with torch.no_grad():
        targets = dino(normalize_images(images))  # (B, N, D)
    batch = prompt_encoder.tokenize(captions)
    input_ids = [row[mask.bool()].tolist() for row, mask in zip(batch.input_ids, batch.attention_mask)]
    rows = {"key": [f"{i:08d}" for i in range(len(scenes))], "caption": captions, "input_ids": input_ids, "dino": list(targets.numpy())}
    if soft_token_mode(config) == "prompt_cache":
        caches = prompt_encoder.encode_prompt_cache(captions)
        rows["next_position"] = [cache.next_position for cache in caches]
        rows["prompt_cache"] = [cache.key_values.numpy() for cache in caches]
    else:
        with torch.no_grad():
            rows["soft_latents"] = list(prompt_encoder(captions).numpy())
        rows["next_position"] = [len(ids) for ids in input_ids]
    return rows, prompt_encoder


def write_feature_dir(config: Gap3DConfig, scenes: list, out: Path, rows_per_shard: int = 128) -> Path:
    """Encode scenes and write `<out>/part-NNNNN.parquet` + manifest.json like the preprocessing job."""
    rows, prompt_encoder = encode_rows(config, scenes)
    out.mkdir(parents=True, exist_ok=True)
    mode = soft_token_mode(config)
    shards = {}
    for index, start in enumerate(range(0, len(scenes), rows_per_shard)):
        part = {name: values[start : start + rows_per_shard] for name, values in rows.items()}
        name = f"part-{index:05d}.parquet"
        pq.write_table(rows_to_table(part, mode), out / name)
        shards[name] = {"rows": len(part["key"]), "skipped": {}}
    text = prompt_encoder.vlm.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    manifest = FeatureManifest(
        encoders=encoder_identity(config),
        dino_shape=[config.aligner.num_tokens, config.aligner.token_dim],
        cache_shape=[text.num_hidden_layers, 2, text.num_key_value_heads, head_dim] if mode == "prompt_cache" else None,
        latents_shape=[config.vlm.num_soft_tokens, text.hidden_size] if mode == "soft_latents" else None,
        shards=shards,
    )
    (out / MANIFEST_NAME).write_text(manifest.to_json())
    return out


_written: dict[str, tuple[Path, Path]] = {}


def synthetic_features(config: Gap3DConfig, num: int, seed: int = 0) -> tuple[Path, Path]:
    """(train_dir, eval_dir) of features for `num` synthetic scenes; held-out shape x colour pairs go to eval.

    Written once per process for each (encoders, num, seed).
    """
    key = json.dumps([encoder_identity(config), num, seed], sort_keys=True)
    if key not in _written:
        _written[key] = _write_synthetic_features(config, num, seed)
    return _written[key]


def _write_synthetic_features(config: Gap3DConfig, num: int, seed: int) -> tuple[Path, Path]:
    scenes = [sample_scene(seed, index) for index in range(num)]
    root = Path(tempfile.mkdtemp(prefix="gap3d-features-"))
    train = write_feature_dir(config, [s for s in scenes if s.split == "train"], root / "train")
    held_out = write_feature_dir(config, [s for s in scenes if s.split == "eval"], root / "eval")
    return train, held_out


def upload_features(local: Path, uri: str) -> str:
    """Copy a feature directory to object storage; returns `uri`."""
    storage.upload_dir(local, uri)
    return uri


# Smaller than the tiny preset so multi-process training runs in seconds on 2 cores: an 8x8 grid (69 tokens).
SMALL_OVERRIDES = (
    "dino.image_size=112", "aligner.grid_size=8", "aligner.hidden_size=64", "aligner.depth=2", "aligner.num_heads=2",
    "train.log_every=5", "train.checkpoint_every=10", "train.eval_every=1000",
)


def small_config(tiny_checkpoints: dict, *overrides: str) -> Gap3DConfig:
    """The tiny preset on the session's tiny checkpoints, shrunk for fast training tests, plus `overrides`."""
    paths = [f"vlm.path={tiny_checkpoints['vlm']}", f"dino.path={tiny_checkpoints['dino']}"]
    return load_config("tiny", overrides=[*paths, *SMALL_OVERRIDES, *overrides])
