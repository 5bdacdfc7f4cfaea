"""Model-side preprocessing: decode a raw shard, and encode its samples into feature-shard rows.

No Ray here: ray_jobs/pipeline.py runs these pieces in Ray Data tasks and actors, and the benchmark's
plain loop calls them directly, so both compute exactly the same thing.
"""

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from gap3d.build import build_encoders
from gap3d.config import Gap3DConfig
from gap3d.data.shards import Sample, Shard, decode_record, iter_shard_records, resize_and_center_crop
from gap3d.features.format import empty_table, rows_to_table
from gap3d.features.identity import expected_manifest, soft_token_mode

logger = logging.getLogger(__name__)

# Skipped by the encoders rather than the decoder: the prompt needs the VLM's tokenizer to measure.
PROMPT_TOO_LONG = "prompt_too_long"


@dataclass
class DecodedShard:
    """The valid samples of one input shard, resized for DINOv2, and what was skipped."""

    keys: list[str]
    captions: list[str]
    images: np.ndarray  # (n, S, S, 3) uint8, S = dino.image_size
    rows_in: int  # records read, valid or not
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def __len__(self) -> int:
        return len(self.keys)


def decode_shard(shard: Shard, image_size: int, min_side: int) -> DecodedShard:
    """Read one raw shard, drop bad records by reason, resize and center-crop the rest to (S, S, 3)."""
    keys, captions, images, skipped, rows_in = [], [], [], Counter(), 0
    for record in iter_shard_records(shard):
        rows_in += 1
        result = decode_record(record, min_side=min_side)
        if not isinstance(result, Sample):
            skipped[result.reason] += 1
            continue
        keys.append(result.key)
        captions.append(result.caption)
        images.append(resize_and_center_crop(result.image, image_size))
    stacked = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), dtype=np.uint8)
    if skipped:
        logger.info("%s: skipped %s", shard.uri, dict(skipped))
    return DecodedShard(keys, captions, stacked, rows_in, dict(skipped))


class FeatureEncoder:
    """Frozen VLM + DINOv2 turning (caption, image) batches into feature-shard rows (gap3d.features schema)."""

    def __init__(self, config: Gap3DConfig, device: str | torch.device = "cpu"):
        self.prompt_encoder, self.dino = build_encoders(config, device)
        self.mode = soft_token_mode(config)
        self.manifest = expected_manifest(config)

    def prompts_fit(self, captions: list[str]) -> list[bool]:
        """Per caption, whether its chat-templated prompt is within vlm.max_prompt_tokens."""
        try:
            self.prompt_encoder.tokenize(captions)
            return [True] * len(captions)
        except ValueError:  # some prompt is too long: find which, one by one
            return [self._prompt_fits(caption) for caption in captions]

    def _prompt_fits(self, caption: str) -> bool:
        try:
            self.prompt_encoder.tokenize([caption])
        except ValueError:
            return False
        return True

    @torch.no_grad()
    def encode(self, keys: list[str], captions: list[str], images: np.ndarray) -> pa.Table:
        """Encode one batch: images uint8 (B, S, S, 3) -> Arrow table of B feature rows."""
        batch = self.prompt_encoder.tokenize(captions)
        input_ids = [ids[mask.bool()].to(torch.int32).numpy() for ids, mask in zip(batch.input_ids, batch.attention_mask)]
        dino = self.dino.encode(images).float().cpu().numpy()  # (B, N, D)
        rows = {"key": list(keys), "caption": list(captions), "input_ids": input_ids, "dino": list(dino)}
        if self.mode == "prompt_cache":
            caches = self.prompt_encoder.encode_prompt_cache(captions)
            rows["prompt_cache"] = [cache.key_values.float().cpu().numpy() for cache in caches]  # each (layers, 2, kv, L, hd)
            rows["next_position"] = [cache.next_position for cache in caches]
        else:
            rows["soft_latents"] = list(self.prompt_encoder(captions).float().cpu().numpy())  # each (s, d_vlm)
            rows["next_position"] = [len(ids) for ids in input_ids]  # text-only prompts: positions 0..L-1
        self._check_shapes(rows, input_ids)
        return rows_to_table(rows, self.mode)

    def _check_shapes(self, rows: dict[str, list], input_ids: list[np.ndarray]) -> None:
        """Raise if the models produce other shapes than the manifest promises (config.json disagrees with weights)."""
        expected = {"dino": [tuple(self.manifest.dino_shape)] * len(input_ids)}
        if self.mode == "prompt_cache":
            layers, two, kv_heads, head_dim = self.manifest.cache_shape
            expected["prompt_cache"] = [(layers, two, kv_heads, len(ids), head_dim) for ids in input_ids]
        else:
            expected["soft_latents"] = [tuple(self.manifest.latents_shape)] * len(input_ids)
        for name, shapes in expected.items():
            actual = [tuple(value.shape) for value in rows[name]]
            if actual != shapes:
                raise ValueError(f"encoders produced {name} of shape {actual[0]}, manifest expects {shapes[0]}; check the checkpoints' config.json")

    def encode_shard(self, decoded: DecodedShard, batch_size: int):
        """Yield (feature table, skipped-by-reason) per batch of `batch_size` samples of a decoded shard."""
        for start in range(0, len(decoded), batch_size):
            stop = min(start + batch_size, len(decoded))
            fits = self.prompts_fit(decoded.captions[start:stop])
            keep = [start + i for i, ok in enumerate(fits) if ok]
            skipped = {PROMPT_TOO_LONG: len(fits) - len(keep)} if len(keep) < len(fits) else {}
            if keep:
                table = self.encode([decoded.keys[i] for i in keep], [decoded.captions[i] for i in keep], decoded.images[keep])
            else:
                table = empty_table(self.mode)
            yield table, skipped
