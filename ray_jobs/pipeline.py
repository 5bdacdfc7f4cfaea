"""Ray Data stages of preprocessing: raw shards -> chunked decode tasks (CPU) -> encoder actor pool.

A decode task reads one input shard and yields it as chunks of `chunk_size` records, each a block of one
row holding the chunk's valid samples resized for DINOv2; Ray Data streams those blocks to the encoder
actors as they are produced and backpressures the decode tasks when the actors fall behind, so memory
follows the chunk, never the shard. In preprocessing each chunk becomes one published feature file; the
driver, seeing every chunk's stats, records a shard as complete once all of its chunks are written.
Duplicate keys across shards are resolved by one small registry actor: the first shard to claim a key
keeps it. Streaming mode (`stream_features`) runs the same stages and emits the encoded rows instead.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import torch

from gap3d.config import Gap3DConfig
from gap3d.data.encode import DecodedChunk, FeatureEncoder, decode_chunks
from gap3d.data.shards import Shard, list_shards
from gap3d.features.format import feature_schema
from gap3d.features.identity import soft_token_mode
from gap3d.features.store import chunk_file_name, write_feature_file


@dataclass
class EncodeResources:
    """Ray resources and chunking of the decode tasks and the encoder actor pool (the `encode:` config section)."""

    encode_batch_size: int = 32  # rows per encoder forward pass
    chunk_size: int = 64  # records per decoded chunk: at 518 px, 64 images are ~50 MiB
    pool_min: int = 1  # encoder actor pool size bounds
    pool_max: int = 8
    num_gpus: float = 1.0  # GPUs per encoder actor (fractions allowed)
    num_cpus: float = 0.0  # CPUs per encoder actor (0 for GPU actors; fractional on small machines)
    decode_num_cpus: float = 1.0  # CPUs per decode task

    def __post_init__(self):
        if not 1 <= self.pool_min <= self.pool_max:
            raise ValueError(f"need 1 <= encode.pool_min <= encode.pool_max, got {self.pool_min}, {self.pool_max}")
        if self.encode_batch_size < 1:
            raise ValueError(f"encode.encode_batch_size must be >= 1, got {self.encode_batch_size}")
        if self.chunk_size < 1:
            raise ValueError(f"encode.chunk_size must be >= 1, got {self.chunk_size}")


# Per preset: GPU actors at the paper preset; one half-CPU actor on a 2-core machine for tiny.
ENCODE_PRESETS = {
    "tiny": EncodeResources(
        encode_batch_size=16, pool_min=1, pool_max=1, num_gpus=0.0, num_cpus=0.5, decode_num_cpus=0.25
    ),
    "paper": EncodeResources(),
}
ENCODE_SECTION = {"encode": (EncodeResources, ENCODE_PRESETS)}
CHUNKS_IN_FLIGHT_PER_ACTOR = 2  # decoded chunks the object store may hold per encoder actor: one in work, one queued
MIN_OBJECT_STORE_BYTES = 64 * 2**20  # below this Ray Data's scheduling, not memory, becomes the limit


def output_stems(shards: list[Shard]) -> list[str]:
    """Feature-file stems of `shards` (shard ids without their suffix), raising when two inputs would share one."""
    seen: dict[str, str] = {}
    for shard in shards:
        if shard.stem in seen:
            raise ValueError(
                f"input shards {seen[shard.stem]} and {shard.uri} would both write {shard.stem}.*.parquet; rename one "
                "or preprocess them into different outputs"
            )
        seen[shard.stem] = shard.uri
    return list(seen)


@ray.remote(num_cpus=0)
class KeyRegistry:
    """Which shard holds each sample key: the first to claim a key keeps it, later claimants drop theirs."""

    def __init__(self, held: dict[str, list[str]]):
        self.owner = {key: stem for stem, keys in held.items() for key in keys}

    def claim(self, stem: str, keys: list[str]) -> list[bool]:
        """Per key, whether `stem` keeps it; claims are idempotent, so a retried task keeps its own keys."""
        return [self.owner.setdefault(key, stem) == stem for key in keys]


def _shard_row(index: int, shard: Shard) -> dict:
    return {
        "shard": index,
        "uri": shard.uri,
        "shard_id": shard.shard_id,
        "format": shard.format,
        "size": shard.size,
        "version": shard.version,
        "metadata_uri": shard.metadata_uri,
    }


def _chunk_block(shard_index: int, shard: Shard, chunk: DecodedChunk) -> dict[str, np.ndarray]:
    """One chunk as a one-row block; the images stay one (1, n, S, S, 3) tensor, never a Python list."""
    stats = {
        "stem": shard.stem,
        "input": shard.uri,
        "input_identity": shard.identity(),
        "chunk": chunk.index,
        "last": chunk.last,
        "rows_in": chunk.rows_in,
        "skipped": chunk.skipped,
        "error": chunk.error,
    }
    return {
        "shard": np.asarray([shard_index]),
        "stats": np.asarray([json.dumps(stats)]),
        "keys": np.asarray([json.dumps(chunk.keys)]),
        "captions": np.asarray([json.dumps(chunk.captions)]),
        "images": chunk.images[None],
    }


def _chunk_from_row(batch: dict[str, np.ndarray], row: int) -> tuple[dict, DecodedChunk]:
    """(the chunk's shard-level stats, the chunk) of row `row` of a decoded-chunk batch."""
    stats = json.loads(batch["stats"][row])
    chunk = DecodedChunk(
        index=stats["chunk"],
        last=stats["last"],
        keys=json.loads(batch["keys"][row]),
        captions=json.loads(batch["captions"][row]),
        images=batch["images"][row],
        rows_in=stats["rows_in"],
        skipped=stats["skipped"],
        error=stats["error"],
    )
    return stats, chunk


def _shard_from_row(batch: dict[str, np.ndarray], row: int) -> Shard:
    """The Shard of row `row` of a shard-row batch (`_shard_row`)."""
    fields = {name: batch[name][row] for name in ("uri", "shard_id", "format", "size", "version", "metadata_uri")}
    return Shard(
        **{
            name: None if _missing(value) else (int(value) if name == "size" else str(value))
            for name, value in fields.items()
        }
    )


def _missing(value) -> bool:
    """Whether a batch field is absent: Ray Data hands a None of a numpy batch over as a float NaN."""
    return value is None or (isinstance(value, float | np.floating) and bool(np.isnan(value)))


def _read_chunks(
    batch: dict[str, np.ndarray], image_size: int, min_side: int, chunk_size: int, registry
) -> Iterator[dict[str, np.ndarray]]:
    """Decode-task body: input shard rows -> one block per chunk (a generator, so blocks stream out as decoded)."""
    for row in range(len(batch["shard"])):
        shard = _shard_from_row(batch, row)
        claim = None if registry is None else lambda keys, stem=shard.stem: ray.get(registry.claim.remote(stem, keys))
        for chunk in decode_chunks(shard, image_size, min_side, chunk_size, claim):
            yield _chunk_block(int(batch["shard"][row]), shard, chunk)


def chunk_bytes(config: Gap3DConfig, resources: EncodeResources) -> int:
    """Size of one decoded chunk's images: chunk_size x S x S x 3 bytes."""
    return resources.chunk_size * config.dino.image_size**2 * 3


def _bound_object_store(dataset: ray.data.Dataset, config: Gap3DConfig, resources: EncodeResources) -> None:
    """Cap this dataset's object store use at a few chunks per encoder actor.

    By default Ray Data lets blocks queue up to a share of the whole object store, so a fast decoder would park
    most of a large shard there (and every process that maps those pages grows); with the cap, the decode tasks'
    streaming outputs are backpressured once the encoders are that far behind.
    """
    limit = max(
        CHUNKS_IN_FLIGHT_PER_ACTOR * resources.pool_max * chunk_bytes(config, resources), MIN_OBJECT_STORE_BYTES
    )
    options = dataset.context.execution_options
    options.resource_limits = options.resource_limits.copy(object_store_memory=limit)


def decoded_chunks(
    config: Gap3DConfig, resources: EncodeResources, shards: list[Shard], registry=None
) -> ray.data.Dataset:
    """One row per decoded chunk ({"shard": index into `shards`, "stats", "keys", "captions", "images"}), decoded in
    CPU tasks."""
    dataset = ray.data.from_items(
        [_shard_row(i, shard) for i, shard in enumerate(shards)], override_num_blocks=max(1, len(shards))
    )
    _bound_object_store(dataset, config, resources)
    return dataset.map_batches(
        _read_chunks,
        batch_size=1,
        num_cpus=resources.decode_num_cpus,
        fn_kwargs={
            "image_size": config.dino.image_size,
            "min_side": config.data.min_image_side,
            "chunk_size": resources.chunk_size,
            "registry": registry,
        },
    )


def _encoder_device(resources: EncodeResources) -> str:
    return "cuda" if resources.num_gpus > 0 and torch.cuda.is_available() else "cpu"


def _encoder_pool(resources: EncodeResources) -> dict:
    """map_batches arguments of the encoder actor pool; a batch is one decoded chunk."""
    return {
        "compute": ray.data.ActorPoolStrategy(min_size=resources.pool_min, max_size=resources.pool_max),
        "batch_size": 1,
        "num_gpus": resources.num_gpus,
        "num_cpus": resources.num_cpus,
    }


class EncodeChunks:
    """Encoder actor for streaming mode: decoded chunks -> feature rows (gap3d.features.format schema)."""

    def __init__(self, config: Gap3DConfig, resources: EncodeResources):
        self.encoder = FeatureEncoder(config, _encoder_device(resources))
        self.batch_size = resources.encode_batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        for row in range(len(batch["shard"])):
            _, chunk = _chunk_from_row(batch, row)
            for table, _ in self.encoder.encode_chunk(chunk, self.batch_size):
                if table.num_rows:
                    yield table


class WriteFeatureChunks:
    """Encoder actor for preprocessing: each decoded chunk -> one published feature file; emits the chunk's stats."""

    def __init__(self, config: Gap3DConfig, resources: EncodeResources, output_uri: str):
        self.encoder = FeatureEncoder(config, _encoder_device(resources))
        self.batch_size = resources.encode_batch_size
        self.output_uri = output_uri
        self.schema = feature_schema(soft_token_mode(config))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        written = []
        for row in range(len(batch["shard"])):
            stats, chunk = _chunk_from_row(batch, row)
            name = chunk_file_name(stats.pop("stem"), chunk.index)
            stats["encoders"] = self.encoder.manifest.encoders
            stats = write_feature_file(
                self.output_uri, name, self.schema, self.encoder.encode_chunk(chunk, self.batch_size), stats
            )
            written.append(json.dumps({**stats, "file": name}))
        return {"shard": batch["shard"], "stats": np.asarray(written)}


def write_features_dataset(
    config: Gap3DConfig, resources: EncodeResources, shards: list[Shard], output_uri: str, registry=None
) -> ray.data.Dataset:
    """Lazy dataset that encodes `shards` and writes their chunk files; rows: {"shard": index, "stats" (JSON)}."""
    return decoded_chunks(config, resources, shards, registry).map_batches(
        WriteFeatureChunks, fn_constructor_args=(config, resources, output_uri), **_encoder_pool(resources)
    )


def stream_features(config: Gap3DConfig, resources: EncodeResources, input_uri: str) -> ray.data.Dataset:
    """Streaming mode: the feature rows preprocessing would write for `input_uri`, computed on the fly.

    Rows have the columns of gap3d.features.format.feature_schema (tensors flattened, fp16); their shapes are in
    gap3d.features.identity.expected_manifest(config). Bad records and duplicate keys are dropped as in preprocessing.
    """
    shards = list_shards(input_uri)
    if not shards:
        raise FileNotFoundError(f"no .tar, .tar.gz, .tgz or .parquet shards at {input_uri}")
    registry = KeyRegistry.remote({})
    return decoded_chunks(config, resources, shards, registry).map_batches(
        EncodeChunks, fn_constructor_args=(config, resources), **_encoder_pool(resources)
    )
