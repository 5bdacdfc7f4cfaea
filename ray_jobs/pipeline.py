"""Ray Data stages of preprocessing: raw shards -> decode tasks (CPU) -> encoder actor pool.

The unit of work is an input shard. A decode task turns one into a single row holding all its valid samples,
resized for DINOv2; an encoder actor encodes that row in batches of encode_batch_size. Keeping a shard in
one place is what lets the writing actor publish one complete feature file per input shard, with no shuffle
and no driver in the data path. Streaming mode (`stream_features`) runs the same stages and emits the encoded
rows instead of writing them.
"""

import json
import pickle
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import torch

from gap3d.config import Gap3DConfig
from gap3d.data.encode import FeatureEncoder, decode_shard
from gap3d.data.shards import Shard, list_shards
from gap3d.features.format import feature_schema
from gap3d.features.identity import soft_token_mode
from gap3d.features.store import write_feature_shard


@dataclass
class EncodeResources:
    """Ray resources of the decode tasks and the encoder actor pool (the `encode:` config section)."""

    encode_batch_size: int = 32  # rows per encoder forward pass
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


# Per preset: GPU actors at the paper preset; one half-CPU actor on a 2-core machine for tiny.
ENCODE_PRESETS = {
    "tiny": EncodeResources(encode_batch_size=16, pool_min=1, pool_max=1, num_gpus=0.0, num_cpus=0.5, decode_num_cpus=0.25),
    "paper": EncodeResources(),
}
ENCODE_SECTION = {"encode": (EncodeResources, ENCODE_PRESETS)}


def output_name(shard: Shard) -> str:
    """Feature-file name of an input shard: its id with the extension replaced by .parquet."""
    return posixpath.splitext(shard.shard_id)[0] + ".parquet"


def output_names(shards: list[Shard]) -> list[str]:
    """Output names of `shards`, raising when two inputs would write the same file."""
    seen: dict[str, str] = {}
    for shard in shards:
        name = output_name(shard)
        if name in seen:
            raise ValueError(f"input shards {seen[name]} and {shard.uri} would both write {name}; rename one or preprocess them into different outputs")
        seen[name] = shard.uri
    return list(seen)


def _decode_row(row: dict, image_size: int, min_side: int) -> dict:
    shard = Shard(uri=row["uri"], shard_id=row["shard_id"], format=row["format"])
    decoded = decode_shard(shard, image_size, min_side)
    # Pickled by hand: Ray would try (and fail) an Arrow conversion of the dataclass first, copying the images.
    return {"output_name": row["output_name"], "uri": row["uri"], "decoded": pickle.dumps(decoded, protocol=pickle.HIGHEST_PROTOCOL)}


def decoded_shards(config: Gap3DConfig, resources: EncodeResources, shards: list[Shard]) -> ray.data.Dataset:
    """One row per input shard ({"output_name", "uri", "decoded": pickled DecodedShard}), decoded in CPU tasks."""
    items = [
        {"uri": shard.uri, "shard_id": shard.shard_id, "format": shard.format, "output_name": name}
        for shard, name in zip(shards, output_names(shards))
    ]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items)))  # one decode task per shard
    return dataset.map(
        _decode_row,
        fn_kwargs={"image_size": config.dino.image_size, "min_side": config.data.min_image_side},
        num_cpus=resources.decode_num_cpus,
    )


def _encoder_device(resources: EncodeResources) -> str:
    return "cuda" if resources.num_gpus > 0 and torch.cuda.is_available() else "cpu"


def _encoder_pool(resources: EncodeResources) -> dict:
    """map_batches arguments of the encoder actor pool; a batch is one decoded shard."""
    return {
        "compute": ray.data.ActorPoolStrategy(min_size=resources.pool_min, max_size=resources.pool_max),
        "batch_size": 1,
        "num_gpus": resources.num_gpus,
        "num_cpus": resources.num_cpus,
    }


class EncodeShards:
    """Encoder actor for streaming mode: decoded shards -> feature rows (gap3d.features.format schema)."""

    def __init__(self, config: Gap3DConfig, resources: EncodeResources):
        self.encoder = FeatureEncoder(config, _encoder_device(resources))
        self.batch_size = resources.encode_batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        for pickled in batch["decoded"]:
            for table, _ in self.encoder.encode_shard(pickle.loads(pickled), self.batch_size):
                if table.num_rows:
                    yield table


class WriteFeatureShards:
    """Encoder actor for preprocessing: each decoded shard -> one published feature file; emits its stats."""

    def __init__(self, config: Gap3DConfig, resources: EncodeResources, output_uri: str):
        self.encoder = FeatureEncoder(config, _encoder_device(resources))
        self.batch_size = resources.encode_batch_size
        self.output_uri = output_uri
        self.schema = feature_schema(soft_token_mode(config))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stats = []
        for name, uri, pickled in zip(batch["output_name"], batch["uri"], batch["decoded"]):
            decoded = pickle.loads(pickled)
            known = {"input": uri, "rows_in": decoded.rows_in, "skipped": decoded.skipped, "encoders": self.encoder.manifest.encoders}
            batches = self.encoder.encode_shard(decoded, self.batch_size)
            stats.append(json.dumps(write_feature_shard(self.output_uri, name, self.schema, batches, known)))
        return {"output_name": np.asarray(batch["output_name"]), "stats": np.asarray(stats)}


def write_features_dataset(config: Gap3DConfig, resources: EncodeResources, shards: list[Shard], output_uri: str) -> ray.data.Dataset:
    """Lazy dataset that encodes `shards` and writes their feature files; rows: {"output_name", "stats" (JSON)}."""
    return decoded_shards(config, resources, shards).map_batches(
        WriteFeatureShards, fn_constructor_args=(config, resources, output_uri), **_encoder_pool(resources)
    )


def stream_features(config: Gap3DConfig, resources: EncodeResources, input_uri: str) -> ray.data.Dataset:
    """Streaming mode: the feature rows preprocessing would write for `input_uri`, computed on the fly.

    Rows have the columns of gap3d.features.format.feature_schema (tensors flattened, fp16); their shapes are in
    gap3d.features.identity.expected_manifest(config). Bad records are dropped as in preprocessing.
    """
    shards = list_shards(input_uri)
    if not shards:
        raise FileNotFoundError(f"no .tar or .parquet shards at {input_uri}")
    return decoded_shards(config, resources, shards).map_batches(EncodeShards, fn_constructor_args=(config, resources), **_encoder_pool(resources))
