"""Feature shards on storage: listing, manifest.json, atomic shard files with their stats, reading rows back.

A feature file is complete exactly when it exists under its final name: it is built in a local temporary
file and published whole (gap3d.storage.publish_file), so a crash never leaves part of a file under a final
name. Its Parquet footer carries its own stats (input, rows, skips, encoder identity), so a resumed run
verifies what it skips and rebuilds the manifest from the files alone.
"""

import json
import logging
import os
import posixpath
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.dataset
import pyarrow.parquet as pq

from gap3d import storage
from gap3d.config import Gap3DConfig
from gap3d.features.format import MANIFEST_NAME, FeatureBatch, FeatureManifest, batch_from_rows
from gap3d.features.identity import check_compatible

logger = logging.getLogger(__name__)

STATS_KEY = b"gap3d.shard_stats"
_FOOTER_READERS = 16  # footers are tiny; object-storage latency dominates, so read many at once


def split_pattern(uri: str) -> tuple[str, str]:
    """(feature directory, file pattern): "d/train-*.parquet" -> ("d", "train-*.parquet"); "d" -> ("d", "**/*.parquet")."""
    uri = str(uri).rstrip("/")
    if not storage.has_glob(uri):
        return uri, "**/*.parquet"
    directory, pattern = uri.rsplit("/", 1)
    if storage.has_glob(directory):
        raise ValueError(f"feature URI {uri}: only the file name may hold a glob, e.g. s3://bucket/features/train-*.parquet")
    return directory, pattern


def read_manifest(uri: str) -> FeatureManifest:
    """The manifest.json of a feature directory (or of a glob's directory); a clear error when there is none."""
    directory, _ = split_pattern(uri)
    fs, root = storage.filesystem(directory)
    path = storage.join(root, MANIFEST_NAME)
    if not fs.isfile(path):
        raise FileNotFoundError(f"no feature manifest at {storage.join(directory, MANIFEST_NAME)}; run ray_jobs/preprocess.py to write features there")
    with fs.open(path, "r") as handle:
        return FeatureManifest.from_json(handle.read(), storage.join(directory, MANIFEST_NAME))


def write_manifest(output_uri: str, manifest: FeatureManifest) -> None:
    """Publish output_uri/manifest.json atomically."""
    target = storage.join(output_uri, MANIFEST_NAME)
    local_path = storage.temp_file_for(target)
    with open(local_path, "w") as handle:
        handle.write(manifest.to_json())
    storage.publish_file(local_path, target)


def feature_files(uri: str) -> list[str]:
    """URIs of the Parquet feature shards of a directory (recursively) or matching a file-name glob, sorted."""
    directory, pattern = split_pattern(uri)
    fs, root = storage.filesystem(directory)
    files = sorted(path for path in fs.glob(storage.join(root, pattern)) if not posixpath.basename(path).startswith((".", "_")))
    if not files:
        raise FileNotFoundError(f"no *.parquet feature shards at {uri}; run ray_jobs/preprocess.py to write them")
    return [storage.with_scheme(uri, path) for path in files]


def check_features(uri: str, config: Gap3DConfig) -> FeatureManifest:
    """Manifest of the features at `uri` after checking they exist and match the configured encoders and aligner."""
    manifest = read_manifest(uri)
    try:
        check_compatible(manifest, config)
    except ValueError as error:
        raise ValueError(f"features at {uri}: {error}") from None
    feature_files(uri)
    return manifest


def count_rows(uri: str) -> int:
    """Rows over all feature shards, from the Parquet footers only."""
    files = feature_files(uri)
    filesystem, _ = storage.arrow_filesystem(files[0])
    paths = [storage.arrow_filesystem(path)[1] for path in files]
    return pyarrow.dataset.dataset(paths, filesystem=filesystem, format="parquet").count_rows()


def load_rows(uri: str, config: Gap3DConfig, limit: int | None = None) -> tuple[FeatureBatch, list[str], list[str]]:
    """Read up to `limit` feature rows into memory (for evaluation) -> (FeatureBatch, captions, keys)."""
    manifest = check_features(uri, config)
    columns = ["key", "caption", "dino", "input_ids", "next_position", manifest.mode]
    tables, remaining = [], limit
    for path in feature_files(uri):
        fs, inner = storage.filesystem(path)
        with fs.open(inner, "rb") as handle:
            table = pq.read_table(handle, columns=columns)
        tables.append(table if remaining is None else table.slice(0, remaining))
        remaining = None if remaining is None else remaining - tables[-1].num_rows
        if remaining == 0:
            break
    table = pa.concat_tables(tables)
    rows = {name: table.column(name).to_numpy(zero_copy_only=False) for name in columns}
    return batch_from_rows(rows, manifest), [str(caption) for caption in rows["caption"]], [str(key) for key in rows["key"]]


def write_feature_shard(output_uri: str, name: str, schema: pa.Schema, batches: Iterable[tuple[pa.Table, dict]], stats: dict) -> dict:
    """Write (table, skipped-by-reason) batches as output_uri/name, published atomically; returns the final stats.

    `stats` holds what is known before encoding ("input", "rows_in", "skipped", "encoders"); rows written and
    skips found while encoding are added, and the whole dict is stored in the file's footer.
    """
    target = storage.join(output_uri, name)
    local_path = storage.temp_file_for(target)
    stats = {**stats, "rows": 0, "skipped": dict(stats.get("skipped", {}))}
    try:
        with pq.ParquetWriter(local_path, schema) as writer:
            for table, skipped in batches:
                if table.num_rows:
                    writer.write_table(table)
                stats["rows"] += table.num_rows
                for reason, count in skipped.items():
                    stats["skipped"][reason] = stats["skipped"].get(reason, 0) + count
            writer.add_key_value_metadata({STATS_KEY: json.dumps(stats, sort_keys=True)})
    except BaseException:
        os.remove(local_path)
        raise
    storage.publish_file(local_path, target)
    return stats


def read_shard_stats(output_uri: str, name: str) -> dict | None:
    """The footer stats of output_uri/name, or None when the file is missing, unreadable or not ours."""
    fs, root = storage.filesystem(output_uri)
    path = storage.join(root, name)
    try:
        with fs.open(path, "rb") as handle:
            metadata = pq.read_metadata(handle)
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowException) as error:
        logger.warning("%s is unreadable (%s); it will be rewritten", path, error)
        return None
    raw = (metadata.metadata or {}).get(STATS_KEY)
    stats = json.loads(raw) if raw else None
    if stats is None or stats.get("rows") != metadata.num_rows:
        logger.warning("%s has no valid gap3d stats in its footer; it will be rewritten", path)
        return None
    return stats


def scan_feature_shards(output_uri: str) -> dict[str, dict]:
    """Stats of every complete feature file directly under output_uri, by name ({} for a new output)."""
    fs, root = storage.filesystem(output_uri)
    fs.invalidate_cache(root)  # other processes (the encoder actors) wrote there since this one last listed it
    if not fs.isdir(root):
        return {}
    names = sorted(
        posixpath.basename(path)
        for path in fs.ls(root, detail=False)
        if path.endswith(".parquet") and not posixpath.basename(path).startswith((".", "_"))
    )
    with ThreadPoolExecutor(_FOOTER_READERS) as pool:
        stats = list(pool.map(lambda name: read_shard_stats(output_uri, name), names))
    return {name: value for name, value in zip(names, stats) if value is not None}
