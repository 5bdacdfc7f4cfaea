"""Model-side preprocessing: decode a raw shard in chunks, and encode each chunk into feature-shard rows.

No Ray here: ray_jobs/pipeline.py runs these pieces in Ray Data tasks and actors, and the benchmark's
plain loop calls them directly, so both compute exactly the same thing. Memory follows the chunk, never
the shard: a chunk holds at most `chunk_size` records' decoded images.
"""

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import pyarrow as pa
import torch

from gap3d.build import build_encoders
from gap3d.config import Gap3DConfig
from gap3d.data.images import resize_and_center_crop
from gap3d.data.shards import RawRecord, Sample, Shard, UnreadableShard, decode_record, iter_shard_records
from gap3d.features.format import empty_table, rows_to_table
from gap3d.features.identity import expected_manifest, soft_token_mode

logger = logging.getLogger(__name__)

# Skipped by the encoders rather than the decoder: the prompt needs the VLM's tokenizer to measure.
PROMPT_TOO_LONG = "prompt_too_long"

# keys -> per key, whether this shard may keep it (False: another shard already holds that key).
ClaimKeys = Callable[[list[str]], list[bool]]


@dataclass
class DecodedChunk:
    """Up to chunk_size consecutive records of one input shard: the valid ones resized for DINOv2, and what was
    skipped."""

    index: int  # chunk number within the shard, from 0
    last: bool  # whether this is the shard's final chunk
    keys: list[str]
    captions: list[str]
    images: np.ndarray  # (n, S, S, 3) uint8, S = dino.image_size
    rows_in: int  # records read, valid or not
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    error: str | None = None  # why the shard could not be read, on its only chunk

    def __len__(self) -> int:
        return len(self.keys)


def _record_chunks(records: Iterator[RawRecord], chunk_size: int) -> Iterator[tuple[list[RawRecord], bool]]:
    """(records, is_last) per chunk; reads one record ahead so the last chunk is known when it is yielded."""
    chunk = list(islice(records, chunk_size))
    while True:
        following = list(islice(records, chunk_size))
        yield chunk, not following
        if not following:
            return
        chunk = following


def _decode_chunk(
    index: int, last: bool, records: list[RawRecord], image_size: int, min_side: int, claim: ClaimKeys | None
) -> DecodedChunk:
    samples, skipped = [], Counter()
    for record in records:
        result = decode_record(record, min_side=min_side, image_size=image_size)
        if isinstance(result, Sample):
            samples.append(result)
        else:
            skipped[result.reason] += 1
    if claim is not None and samples:
        kept = claim([sample.key for sample in samples])
        skipped["duplicate_key"] += kept.count(False)
        samples = [sample for sample, keep in zip(samples, kept) if keep]
    images = (
        np.stack([resize_and_center_crop(s.image, image_size) for s in samples])
        if samples
        else np.zeros((0, image_size, image_size, 3), np.uint8)
    )
    return DecodedChunk(
        index, last, [s.key for s in samples], [s.caption for s in samples], images, len(records), dict(+skipped)
    )


def decode_chunks(
    shard: Shard, image_size: int, min_side: int, chunk_size: int, claim: ClaimKeys | None = None
) -> Iterator[DecodedChunk]:
    """Read one raw shard as chunks of `chunk_size` records, bad ones dropped by reason, images (S, S, 3).

    An empty shard gives one empty chunk, so every shard has a last chunk. A file that is not a shard gives
    one chunk with `error` set and one `unreadable_shard` skip. `claim` decides which valid keys this shard keeps.
    """
    records = iter_shard_records(shard)
    index = 0
    try:
        for index, (chunk, last) in enumerate(_record_chunks(records, chunk_size)):
            yield _decode_chunk(index, last, chunk, image_size, min_side, claim)
    except UnreadableShard as error:
        logger.warning("skipping %s: %s", shard.uri, error)
        empty = np.zeros((0, image_size, image_size, 3), np.uint8)
        yield DecodedChunk(index, True, [], [], empty, 0, {"unreadable_shard": 1}, error=str(error))


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
        input_ids = [
            ids[mask.bool()].to(torch.int32).numpy() for ids, mask in zip(batch.input_ids, batch.attention_mask)
        ]
        dino = self.dino.encode(images).float().cpu().numpy()  # (B, N, D)
        rows = {"key": list(keys), "caption": list(captions), "input_ids": input_ids, "dino": list(dino)}
        if self.mode == "prompt_cache":
            caches = self.prompt_encoder.encode_prompt_cache(captions)
            rows["prompt_cache"] = [
                cache.key_values.float().cpu().numpy() for cache in caches
            ]  # each (layers, 2, kv, L, hd)
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
                raise ValueError(
                    f"encoders produced {name} of shape {actual[0]}, manifest expects {shapes[0]}; check the "
                    "checkpoints' config.json"
                )

    def encode_chunk(self, chunk: DecodedChunk, batch_size: int) -> Iterator[tuple[pa.Table, dict[str, int]]]:
        """Yield (feature table, skipped-by-reason) per batch of `batch_size` samples of a decoded chunk."""
        for start in range(0, len(chunk), batch_size):
            stop = min(start + batch_size, len(chunk))
            fits = self.prompts_fit(chunk.captions[start:stop])
            keep = [start + i for i, ok in enumerate(fits) if ok]
            skipped = {PROMPT_TOO_LONG: len(fits) - len(keep)} if len(keep) < len(fits) else {}
            if keep:
                table = self.encode(
                    [chunk.keys[i] for i in keep], [chunk.captions[i] for i in keep], chunk.images[keep]
                )
            else:
                table = empty_table(self.mode)
            yield table, skipped
