"""Preprocess raw image-caption shards into feature files for training.

    python ray_jobs/preprocess.py --input URI --output URI [--preset tiny|paper] [--config YAML] [key.sub=value ...]
    ray job submit --working-dir . -- python ray_jobs/preprocess.py --input s3://... --output s3://...

Reads a directory, prefix, glob or file of WebDataset tars (.tar, .tar.gz, .tgz; img2dataset's output as is) or
Parquet shards, in chunks of encode.chunk_size records. Writes one Parquet feature file per chunk (DINOv2 targets
+ VLM prompt caches or soft latents, schema in gap3d/features/format.py), a completion record per input shard, and
manifest.json (layout in gap3d/features/store.py). Rerunning skips the input shards whose record matches the input
as it is now (size and ETag/mtime) and re-encodes the rest, so a crashed, extended or changed input is brought up to
date by running it again. Ends with one JSON summary line on stdout.
"""

import argparse
import json
import logging
import sys
import time
from collections import Counter

import ray

from gap3d import storage
from gap3d.config import Gap3DConfig
from gap3d.data.shards import Shard, list_shards
from gap3d.features.identity import expected_manifest
from gap3d.features.store import read_keys, read_shard_records, remove_shard_outputs, write_manifest, write_shard_record
from ray_jobs.config import add_config_arguments, configure_logging, job_config_from_args
from ray_jobs.nodes import remove_stale_staging_everywhere
from ray_jobs.pipeline import ENCODE_SECTION, EncodeResources, KeyRegistry, output_stems, write_features_dataset

logger = logging.getLogger("gap3d.preprocess")


def _check_same_encoders(records: dict[str, dict], identity: dict, output_uri: str) -> None:
    for stem, record in records.items():
        if record.get("encoders") != identity:
            raise ValueError(
                f"{output_uri}/{stem}.* was written by other encoders ({record.get('encoders')}) than configured "
                f"({identity}); "
                "preprocess into a new output directory, or delete the old features"
            )


class ShardAssembler:
    """Collects chunk stats as they arrive and publishes a shard's completion record once all its chunks are written."""

    def __init__(self, output_uri: str, shards: list[Shard]):
        self.output_uri, self.shards = output_uri, shards
        self.chunks: dict[int, dict[int, dict]] = {}
        self.chunk_count: dict[int, int] = {}

    def add(self, shard_index: int, stats: dict) -> dict | None:
        """Record one chunk's stats; returns the shard's completion record when this chunk completes it."""
        self.chunks.setdefault(shard_index, {})[stats["chunk"]] = stats
        if stats["last"]:
            self.chunk_count[shard_index] = stats["chunk"] + 1
        if len(self.chunks[shard_index]) != self.chunk_count.get(shard_index):
            return None
        received = self.chunks.pop(shard_index)
        chunks = [received[i] for i in range(self.chunk_count.pop(shard_index))]
        skipped = Counter()
        for chunk in chunks:
            skipped.update(chunk["skipped"])
        shard = self.shards[shard_index]
        record = {
            "input": shard.uri,
            "input_identity": shard.identity(),
            "encoders": chunks[0]["encoders"],
            "files": {chunk["file"]: chunk["bytes"] for chunk in chunks},
            "rows": sum(c["rows"] for c in chunks),
            "rows_in": sum(c["rows_in"] for c in chunks),
            "skipped": dict(sorted(skipped.items())),
        }
        if chunks[-1]["error"]:
            record["error"] = chunks[-1]["error"]
        write_shard_record(self.output_uri, shard.stem, record)
        return record


def _up_to_date(shards: list[Shard], records: dict[str, dict]) -> set[str]:
    """Stems whose completion record matches the input shard as listed now."""
    return {
        shard.stem
        for shard in shards
        if shard.stem in records and records[shard.stem].get("input_identity") == shard.identity()
    }


def _registry(output_uri: str, records: dict[str, dict], pending: set[str]):
    """The key registry, holding the keys of every complete shard that stays."""
    held = {stem: read_keys(output_uri, record["files"]) for stem, record in records.items() if stem not in pending}
    return KeyRegistry.remote(held)


def run_preprocess(config: Gap3DConfig, resources: EncodeResources, input_uri: str, output_uri: str) -> dict:
    """Encode every input shard without an up-to-date completion record under output_uri; returns the run's summary."""
    start = time.perf_counter()
    manifest = expected_manifest(config)
    shards = list_shards(input_uri, exclude=output_uri)
    output_stems(shards)
    storage.remove_partial_files(output_uri)
    remove_stale_staging_everywhere()
    records = read_shard_records(output_uri)
    _check_same_encoders(records, manifest.encoders, output_uri)
    done = _up_to_date(shards, records)
    pending = [shard for shard in shards if shard.stem not in done]
    changed = [shard.stem for shard in pending if shard.stem in records]
    if changed:
        logger.info(
            "%d input shards changed since they were encoded; encoding them again: %s", len(changed), changed[:10]
        )
    remove_shard_outputs(output_uri, [shard.stem for shard in pending])
    for stem in changed:
        records.pop(stem)
    logger.info("%d input shards, %d up to date, %d to encode", len(shards), len(done), len(pending))
    rows_in, rows_written, skipped, unreadable = 0, 0, Counter(), []
    if pending:
        assembler = ShardAssembler(output_uri, pending)
        registry = _registry(output_uri, records, {shard.stem for shard in pending})
        finished = 0
        for row in write_features_dataset(config, resources, pending, output_uri, registry).iter_rows():
            stats = json.loads(row["stats"])
            rows_in += stats["rows_in"]
            rows_written += stats["rows"]
            skipped.update(stats["skipped"])
            record = assembler.add(int(row["shard"]), stats)
            if record is None:
                continue
            finished += 1
            records[pending[int(row["shard"])].stem] = record
            if "error" in record:
                unreadable.append({"input": record["input"], "error": record["error"]})
            elapsed = time.perf_counter() - start
            logger.info(
                "%s: %d rows, skipped %s (%d/%d shards, %.1f rows/s)",
                record["input"],
                record["rows"],
                record["skipped"],
                finished,
                len(pending),
                rows_written / elapsed,
            )
    manifest.shards = {
        stem: {k: v for k, v in record.items() if k != "encoders"} for stem, record in sorted(records.items())
    }
    manifest.count_totals()
    write_manifest(output_uri, manifest)
    wall_s = time.perf_counter() - start
    return {
        "input": input_uri,
        "output": output_uri,
        "shards_in": len(shards),
        "shards_written": len(pending),
        "shards_already_complete": len(done),
        "shards_changed": len(changed),
        "shards_unreadable": unreadable,
        "rows_in": rows_in,
        "rows_written": rows_written,
        "skipped": dict(sorted(skipped.items())),
        "rows_in_manifest": manifest.totals["rows"],
        "totals_all_runs": manifest.totals,
        "wall_s": round(wall_s, 3),
        "rows_per_s": round(rows_written / wall_s, 2),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="preprocess", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input", required=True, help="raw shards: directory, glob or file; local path, file:// or s3:// URI"
    )
    parser.add_argument("--output", required=True, help="feature directory (local path or s3:// URI)")
    add_config_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; connects to the cluster at RAY_ADDRESS, else starts a local one."""
    args = parse_args(argv)
    configure_logging()
    config, sections = job_config_from_args(args, ENCODE_SECTION)
    ray.init()
    summary = run_preprocess(config, sections["encode"], args.input, args.output)
    ray.shutdown()  # Ray forwards worker and raylet output to stdout until then; the summary must be the last line
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
