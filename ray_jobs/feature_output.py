"""Feature shards on storage: output names, atomic publication, completeness, manifest.json.

A feature file is complete exactly when it exists under its final name: it is built in a local temporary
file and published whole (a rename on a local filesystem, one upload on object storage), so a crash never
leaves a partial file under a final name. Its Parquet footer carries its own stats (input, rows, skips,
encoder identity), so a resumed run verifies what it skips and rebuilds the manifest from the files alone.
"""

import json
import logging
import os
import posixpath
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from gap3d import storage
from gap3d.data.shards import Shard
from gap3d.features import MANIFEST_NAME, FeatureManifest

logger = logging.getLogger(__name__)

STATS_KEY = b"gap3d.shard_stats"
_FOOTER_READERS = 16  # footers are tiny; object-storage latency dominates, so read many at once


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


def _local_temp(fs, root: str, name: str, remote: bool) -> str:
    # Locally the temp file sits beside its target so the rename is atomic; the leading dot hides it from readers.
    directory = None if remote else root
    if directory is not None:
        fs.makedirs(directory, exist_ok=True)
    handle, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=directory)
    os.close(handle)
    os.chmod(path, 0o644)  # mkstemp's 0600 would survive the rename
    return path


def _publish(local_path: str, output_uri: str, name: str) -> None:
    """Move a finished local file to output_uri/name in one step (rename, or a single upload)."""
    fs, root = storage.filesystem(output_uri)
    target = storage.join(root, name)
    try:
        if storage.is_remote(output_uri):
            fs.put_file(local_path, target)
        else:
            os.replace(local_path, target)
    finally:
        if os.path.exists(local_path):
            os.remove(local_path)


def remove_stale_temp_files(output_uri: str) -> int:
    """Delete the temporary files killed writers left in a local output directory; returns how many.

    Run before this run's writers start: two runs into one output at the same time are not supported.
    """
    if storage.is_remote(output_uri):
        return 0  # temporary files live on the writers' local disks, never under the output
    fs, root = storage.filesystem(output_uri)
    stale = [path for path in fs.glob(storage.join(root, ".*.partial"))]
    for path in stale:
        fs.rm_file(path)
    if stale:
        logger.info("removed %d temporary files left by an interrupted run in %s", len(stale), output_uri)
    return len(stale)


def write_feature_shard(output_uri: str, name: str, schema: pa.Schema, batches: Iterable[tuple[pa.Table, dict]], stats: dict) -> dict:
    """Write (table, skipped-by-reason) batches as output_uri/name, published atomically; returns the final stats.

    `stats` holds what is known before encoding ("input", "rows_in", "skipped", "encoders"); rows written and
    skips found while encoding are added, and the whole dict is stored in the file's footer.
    """
    fs, root = storage.filesystem(output_uri)
    local_path = _local_temp(fs, root, name, storage.is_remote(output_uri))
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
        _publish(local_path, output_uri, name)
    finally:
        if os.path.exists(local_path):
            os.remove(local_path)
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


def write_manifest(output_uri: str, manifest: FeatureManifest) -> None:
    """Publish output_uri/manifest.json atomically."""
    fs, root = storage.filesystem(output_uri)
    local_path = _local_temp(fs, root, MANIFEST_NAME, storage.is_remote(output_uri))
    with open(local_path, "w") as handle:
        handle.write(manifest.to_json())
    _publish(local_path, output_uri, MANIFEST_NAME)


def read_manifest(output_uri: str) -> FeatureManifest:
    """The manifest.json of a feature directory."""
    fs, root = storage.filesystem(output_uri)
    path = storage.join(root, MANIFEST_NAME)
    if not fs.isfile(path):
        raise FileNotFoundError(f"no {MANIFEST_NAME} at {output_uri}; run ray_jobs/preprocess.py into it first")
    with fs.open(path, "r") as handle:
        return FeatureManifest.from_json(handle.read())
