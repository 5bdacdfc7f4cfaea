"""Ray Data stages of preprocessing: raw shards -> decode tasks (CPU) -> encoder actor pool.

The unit of work is an input shard. A decode task turns one into a single row holding all its valid samples,
resized for DINOv2; an encoder actor encodes that row in batches of data.encode_batch_size. Keeping a shard in
one place is what lets the writing actor publish one complete feature file per input shard, with no shuffle
and no driver in the data path. Streaming mode (`stream_features`, shapes in `stream_manifest`) runs the same stages
and emits the encoded rows instead of writing them.
"""

import json
import pickle
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import ray
import torch

from gap3d.config import Gap3DConfig
from gap3d.data.encode import FeatureEncoder, decode_shard, feature_manifest
from gap3d.data.shards import Shard, list_shards
from gap3d.features import FeatureManifest, feature_schema, soft_token_mode
from gap3d.tiny_models import ensure_tiny_checkpoints
from ray_jobs.feature_output import output_names, write_feature_shard


def _decode_row(row: dict, image_size: int, min_side: int) -> dict:
    shard = Shard(uri=row["uri"], shard_id=row["shard_id"], format=row["format"])
    decoded = decode_shard(shard, image_size, min_side)
    # Pickled by hand: Ray would try (and fail) an Arrow conversion of the dataclass first, copying the images.
    return {"output_name": row["output_name"], "uri": row["uri"], "decoded": pickle.dumps(decoded, protocol=pickle.HIGHEST_PROTOCOL)}


def decoded_shards(config: Gap3DConfig, shards: list[Shard]) -> ray.data.Dataset:
    """One row per input shard ({"output_name", "uri", "decoded": pickled DecodedShard}), decoded in CPU tasks."""
    items = [
        {"uri": shard.uri, "shard_id": shard.shard_id, "format": shard.format, "output_name": name}
        for shard, name in zip(shards, output_names(shards))
    ]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items)))  # one decode task per shard
    return dataset.map(
        _decode_row,
        fn_kwargs={"image_size": config.dino.image_size, "min_side": config.data.min_image_side},
        num_cpus=config.data.decode_num_cpus,
    )


def _encoder_device(config: Gap3DConfig) -> str:
    return "cuda" if config.data.encoder_num_gpus > 0 and torch.cuda.is_available() else "cpu"


def _encoder_pool(config: Gap3DConfig) -> dict:
    """map_batches arguments of the encoder actor pool; a batch is one decoded shard."""
    return {
        "compute": ray.data.ActorPoolStrategy(min_size=config.data.encoder_pool_min, max_size=config.data.encoder_pool_max),
        "batch_size": 1,
        "num_gpus": config.data.encoder_num_gpus,
        "num_cpus": config.data.encoder_num_cpus,
    }


class EncodeShards:
    """Encoder actor for streaming mode: decoded shards -> feature rows (gap3d.features schema)."""

    def __init__(self, config: Gap3DConfig):
        self.encoder = FeatureEncoder(config, _encoder_device(config))
        self.batch_size = config.data.encode_batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        for pickled in batch["decoded"]:
            for table, _ in self.encoder.encode_shard(pickle.loads(pickled), self.batch_size):
                if table.num_rows:
                    yield table


class WriteFeatureShards:
    """Encoder actor for preprocessing: each decoded shard -> one published feature file; emits its stats."""

    def __init__(self, config: Gap3DConfig, output_uri: str):
        self.encoder = FeatureEncoder(config, _encoder_device(config))
        self.batch_size = config.data.encode_batch_size
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


def write_features_dataset(config: Gap3DConfig, shards: list[Shard], output_uri: str) -> ray.data.Dataset:
    """Lazy dataset that encodes `shards` and writes their feature files; rows: {"output_name", "stats" (JSON)}."""
    return decoded_shards(config, shards).map_batches(WriteFeatureShards, fn_constructor_args=(config, output_uri), **_encoder_pool(config))


def stream_features(config: Gap3DConfig, input_uri: str) -> ray.data.Dataset:
    """Streaming mode: the feature rows preprocessing would write for `input_uri`, computed on the fly.

    Rows have the columns of gap3d.features.feature_schema (tensors flattened, fp16); their shapes are in
    stream_manifest(config). Bad records are dropped as in preprocessing.
    """
    ensure_tiny_checkpoints(config)
    shards = list_shards(input_uri)
    if not shards:
        raise FileNotFoundError(f"no .tar or .parquet shards at {input_uri}")
    return decoded_shards(config, shards).map_batches(EncodeShards, fn_constructor_args=(config,), **_encoder_pool(config))


def stream_manifest(config: Gap3DConfig) -> FeatureManifest:
    """Encoder identity and tensor shapes of the rows `stream_features(config, ...)` yields (no shard entries)."""
    ensure_tiny_checkpoints(config)
    return feature_manifest(config)
