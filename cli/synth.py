"""Render the synthetic image-caption world into WebDataset tar shards (train/eval splits).

    python -m cli synth --out URI --num N [--seed S] [--shard-size K] [--image-size PX] [--workers W]

Same arguments give the same bytes, whatever the number of worker processes. Prints the summary (also written as
synth.json) as one JSON line.
"""

import argparse
import json
import os
import sys

from miniature.shards import write_synth
from ray_jobs.config import configure_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="synth", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output directory: local path, file:// or s3:// URI")
    parser.add_argument("--num", type=int, required=True, help="number of samples over both splits")
    parser.add_argument("--seed", type=int, default=0, help="same seed and arguments give the same bytes")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="rendering processes (default: CPUs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    summary = write_synth(args.out, args.num, args.seed, args.shard_size, args.image_size, workers=args.workers)
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
