"""Mirror checkpoints named on the Hugging Face hub into object storage, for clusters whose nodes do not reach it.

    python -m cli mirror-checkpoints --to s3://bucket/models Qwen/Qwen2.5-VL-3B-Instruct \
        facebook/dinov2-with-registers-large microsoft/TRELLIS-image-large [org/name@revision ...]

Each name is resolved through huggingface_hub on this machine (its cache, HF_TOKEN, HF_ENDPOINT and
HF_HUB_OFFLINE apply) and copied file by file to `<to>/<name>/` (a pinned name keeps its `@revision`), the record
`.gap3d_mirror.json` (repository, revision, commit) last; a copy whose record names the same commit is skipped.
Jobs and services then name the copy (`vlm.path=s3://bucket/models/Qwen/Qwen2.5-VL-3B-Instruct`), which every node
downloads once into its cache. The copy holds the same files, so its fingerprint (gap3d.checkpoints.fingerprint)
is the name's. Prints one JSON line: per name, where it went, its commit, files and bytes copied.
"""

import argparse
import json
import logging
import sys

from gap3d import checkpoints, hub, storage
from ray_jobs.config import configure_logging

logger = logging.getLogger("gap3d.mirror")

RECORD_NAME = ".gap3d_mirror.json"  # a dotfile: fingerprints leave it out, so the copy matches the original


def mirror(name: str, to: str) -> dict:
    """Copy hub checkpoint `name` to `<to>/<name>/`; returns {"name", "uri", "commit", "files", "bytes", "skipped"}."""
    parsed = hub.parse(name)
    if parsed is None:
        raise ValueError(
            f"{name!r} is not a hub name (org/name or org/name@revision), or a local path of that name exists"
        )
    source = checkpoints.resolve(name)
    commit = source.name  # huggingface_hub's snapshot folder is named after the commit it holds
    uri = storage.join(to, str(parsed))
    fs, root = storage.filesystem(uri)
    record_path = storage.join(root, RECORD_NAME)
    if fs.isfile(record_path) and json.loads(fs.cat_file(record_path)).get("commit") == commit:
        logger.info("%s is already mirrored at %s (commit %s)", name, uri, commit)
        return {"name": name, "uri": uri, "commit": commit, "files": 0, "bytes": 0, "skipped": True}
    files = sorted(path for path in source.rglob("*") if path.is_file())
    for path in files:  # snapshot files are links into huggingface_hub's blob store: copy what they point at
        fs.put_file(str(path.resolve()), storage.join(root, path.relative_to(source).as_posix()))
    record = {"repo_id": parsed.repo_id, "revision": parsed.revision, "commit": commit}
    fs.pipe_file(record_path, json.dumps(record, indent=2).encode())
    size = sum(path.stat().st_size for path in files)
    logger.info("mirrored %s (commit %s): %d files, %d bytes to %s", name, commit, len(files), size, uri)
    return {"name": name, "uri": uri, "commit": commit, "files": len(files), "bytes": size, "skipped": False}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mirror-checkpoints", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="+", help="hub names, org/name or org/name@revision")
    parser.add_argument("--to", required=True, help="object-storage prefix, e.g. s3://bucket/models (or a local path)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    results = [mirror(name, args.to) for name in args.names]
    sys.stdout.write(json.dumps({"mirrored": results}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
