"""Features on storage: chunk files, shard completion records, manifest.json, reading rows back.

Layout of a feature directory:
    <stem>.<chunk:05d>.parquet   one feature file per chunk of an input shard (the read unit of training)
    shards/<stem>.json           the input shard's completion record: its identity, files, rows and skips
    manifest.json                shapes, encoder identity, and every complete shard's record with totals
Every file is built in a local temporary file and published whole (gap3d.storage.publish_file), so a crash
never leaves part of a file under a final name. A shard is complete exactly when its record exists: the
record is published after all of its chunk files, and readers take only the files the manifest lists.
"""

import json
import logging
import os
import posixpath
import re
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
RECORDS_DIR = "shards"
_FOOTER_READERS = 16  # footers are tiny; object-storage latency dominates, so read many at once


def split_pattern(uri: str) -> tuple[str, str]:
    """(feature directory, file pattern): "d/train-*.parquet" -> ("d", "train-*.parquet"); "d" -> ("d",
    "**/*.parquet")."""
    uri = str(uri).rstrip("/")
    if not storage.has_glob(uri):
        return uri, "**/*.parquet"
    directory, pattern = uri.rsplit("/", 1)
    if storage.has_glob(directory):
        raise ValueError(
            f"feature URI {uri}: only the file name may hold a glob, e.g. s3://bucket/features/train-*.parquet"
        )
    return directory, pattern


def read_manifest(uri: str) -> FeatureManifest:
    """The manifest.json of a feature directory (or of a glob's directory); a clear error when there is none."""
    directory, _ = split_pattern(uri)
    fs, root = storage.filesystem(directory)
    path = storage.join(root, MANIFEST_NAME)
    if not fs.isfile(path):
        raise FileNotFoundError(
            f"no feature manifest at {storage.join(directory, MANIFEST_NAME)}; run ray_jobs/preprocess.py to write "
            "features there"
        )
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
    """URIs of the feature files of a directory or file-name glob that its manifest lists (complete shards only),
    sorted.

    A listed file whose size is not the one its shard record gives (truncated, or rewritten since) fails, naming it.
    """
    directory, pattern = split_pattern(uri)
    listed = {
        name: size
        for entry in read_manifest(directory).shards.values()
        for name, size in entry.get("files", {}).items()
    }
    fs, root = storage.filesystem(directory)
    found = fs.glob(storage.join(root, pattern), detail=True)
    files = sorted(path for path in found if posixpath.relpath(path, root) in listed)
    for path in files:
        recorded = listed[posixpath.relpath(path, root)]
        if found[path]["size"] != recorded:
            raise ValueError(
                f"feature file {storage.with_scheme(uri, path)} has {found[path]['size']} bytes, its shard record "
                f"{recorded}: it was cut short "
                "or changed after preprocessing; rerun ray_jobs/preprocess.py with the same --input and --output to "
                "encode its shard again"
            )
    if not files:
        raise FileNotFoundError(
            f"no *.parquet feature shards of complete input shards at {uri}; run ray_jobs/preprocess.py to write them"
        )
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
    return (
        batch_from_rows(rows, manifest),
        [str(caption) for caption in rows["caption"]],
        [str(key) for key in rows["key"]],
    )


def write_feature_file(
    output_uri: str, name: str, schema: pa.Schema, batches: Iterable[tuple[pa.Table, dict]], stats: dict
) -> dict:
    """Write (table, skipped-by-reason) batches as output_uri/name, published atomically; returns the final stats.

    `stats` holds what is known before encoding ("input", "rows_in", "skipped", "encoders"); rows written and
    skips found while encoding are added, and the whole dict is stored in the file's footer; the returned
    stats also hold the file's size in "bytes".
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
    size = os.path.getsize(local_path)
    storage.publish_file(local_path, target)
    return {**stats, "bytes": size}


def chunk_file_name(stem: str, index: int) -> str:
    """Name of chunk `index` of the input shard with feature stem `stem`."""
    return f"{stem}.{index:05d}.parquet"


def write_shard_record(output_uri: str, stem: str, record: dict) -> None:
    """Publish the completion record of input shard `stem` (after all its chunk files)."""
    target = storage.join(output_uri, RECORDS_DIR, f"{stem}.json")
    local_path = storage.temp_file_for(target)
    with open(local_path, "w") as handle:
        json.dump(record, handle, sort_keys=True)
    storage.publish_file(local_path, target)


def _read_json(fs, path: str) -> dict | None:
    try:
        with fs.open(path, "r") as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        logger.warning("%s is unreadable (%s); its shard will be encoded again", path, error)
        return None


def read_shard_records(output_uri: str) -> dict[str, dict]:
    """Completion records under output_uri, by stem, whose chunk files all exist at their recorded sizes ({} for a new
    output)."""
    fs, root = storage.filesystem(output_uri)
    fs.invalidate_cache(root)  # other processes (the encoder actors) wrote there since this one last listed it
    records_dir = storage.join(root, RECORDS_DIR)
    if not fs.isdir(records_dir):
        return {}
    paths = sorted(path for path in fs.ls(records_dir, detail=False) if path.endswith(".json"))
    with ThreadPoolExecutor(_FOOTER_READERS) as pool:
        records = list(pool.map(lambda path: _read_json(fs, path), paths))
    sizes = {posixpath.basename(info["name"]): info["size"] for info in fs.ls(root, detail=True)}
    complete = {}
    for path, record in zip(paths, records):
        stem = posixpath.basename(path)[: -len(".json")]
        if record is None:
            continue
        damaged = [name for name, size in record.get("files", {}).items() if sizes.get(name) != size]
        if damaged:
            logger.warning(
                "feature files %s of shard %s are missing or changed; the shard will be encoded again", damaged, stem
            )
        else:
            complete[stem] = record
    return complete


def remove_shard_outputs(output_uri: str, stems: list[str]) -> int:
    """Delete the completion records and chunk files of input shards `stems` (record first); returns files removed."""
    fs, root = storage.filesystem(output_uri)
    if not fs.isdir(root) or not stems:
        return 0
    records = {storage.join(root, RECORDS_DIR, f"{stem}.json") for stem in stems}
    chunk = re.compile(r"(.+)\.\d{5}\.parquet")
    wanted = set(stems)
    chunks = [
        path
        for path in fs.ls(root, detail=False)
        if (match := chunk.fullmatch(posixpath.basename(path))) and match.group(1) in wanted
    ]
    stale = [path for path in records if fs.exists(path)] + chunks
    for path in stale:
        fs.rm_file(path)
    return len(stale)


def read_keys(output_uri: str, files: list[str]) -> list[str]:
    """The `key` column of feature files (names under output_uri)."""
    fs, root = storage.filesystem(output_uri)

    def keys(name: str) -> list[str]:
        with fs.open(storage.join(root, name), "rb") as handle:
            return pq.read_table(handle, columns=["key"]).column("key").to_pylist()

    with ThreadPoolExecutor(_FOOTER_READERS) as pool:
        return [key for part in pool.map(keys, files) for key in part]
