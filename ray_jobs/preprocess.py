"""Preprocess raw image-caption shards into feature shards for training.

    python -m ray_jobs.preprocess --input URI --output URI [--preset tiny|paper] [--config YAML] [key.sub=value ...]
    ray job submit --working-dir . -- python ray_jobs/preprocess.py --input s3://... --output s3://...

Writes one Parquet feature file per input shard (DINOv2 targets + VLM prompt caches or soft latents, schema in
gap3d/features/format.py) and manifest.json. Rerunning skips input shards whose feature file is complete, so a
crashed or extended run is resumed by running it again. Ends with one JSON summary line on stdout.
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
from gap3d.data.shards import list_shards
from gap3d.features.identity import expected_manifest
from gap3d.features.store import scan_feature_shards, write_manifest
from ray_jobs.config import add_config_arguments, configure_logging, job_config_from_args
from ray_jobs.pipeline import ENCODE_SECTION, EncodeResources, output_names, write_features_dataset

logger = logging.getLogger("gap3d.preprocess")


def _check_same_encoders(complete: dict[str, dict], identity: dict, output_uri: str) -> None:
    for name, stats in complete.items():
        if stats.get("encoders") != identity:
            raise ValueError(
                f"{output_uri}/{name} was written by other encoders ({stats.get('encoders')}) than configured ({identity}); "
                "preprocess into a new output directory, or delete the old features"
            )


def run_preprocess(config: Gap3DConfig, resources: EncodeResources, input_uri: str, output_uri: str) -> dict:
    """Encode every input shard without a complete feature file under output_uri; returns the run's summary."""
    start = time.perf_counter()
    manifest = expected_manifest(config)
    shards = list_shards(input_uri)
    names = output_names(shards)
    storage.remove_partial_files(output_uri)
    complete = scan_feature_shards(output_uri)
    _check_same_encoders(complete, manifest.encoders, output_uri)
    pending = [shard for shard, name in zip(shards, names) if name not in complete]
    logger.info("%d input shards, %d already complete, %d to encode", len(shards), len(shards) - len(pending), len(pending))
    rows_in, rows_written, skipped = 0, 0, Counter()
    if pending:
        for done, row in enumerate(write_features_dataset(config, resources, pending, output_uri).iter_rows(), start=1):
            stats = json.loads(row["stats"])
            complete[row["output_name"]] = stats
            rows_in += stats["rows_in"]
            rows_written += stats["rows"]
            skipped.update(stats["skipped"])
            elapsed = time.perf_counter() - start
            logger.info("%s: %d rows, skipped %s (%d/%d shards, %.1f rows/s)", row["output_name"], stats["rows"], stats["skipped"], done, len(pending), rows_written / elapsed)
    manifest.shards = {name: {k: v for k, v in stats.items() if k != "encoders"} for name, stats in sorted(complete.items())}
    write_manifest(output_uri, manifest)
    wall_s = time.perf_counter() - start
    return {
        "input": input_uri,
        "output": output_uri,
        "shards_in": len(shards),
        "shards_written": len(pending),
        "shards_already_complete": len(shards) - len(pending),
        "rows_in": rows_in,
        "rows_written": rows_written,
        "skipped": dict(sorted(skipped.items())),
        "rows_in_manifest": sum(stats["rows"] for stats in complete.values()),
        "wall_s": round(wall_s, 3),
        "rows_per_s": round(rows_written / wall_s, 2),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="preprocess", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="raw shards: directory, glob or file; local path, file:// or s3:// URI")
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
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
