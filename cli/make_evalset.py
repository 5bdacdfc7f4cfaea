"""Build Table 3's evaluation set from meshes and captions: ground-truth renders, DINOv2 targets, shards.

    python -m cli make-evalset --meshes DIR --captions Toys4k.csv --out s3://bucket/evalsets/toys4k \
        [--limit 1250] [--seed 0] [--up-axis y] [--resolution 512] [--preset paper] [dino.path=...]

--meshes is a directory of GLB / glTF / OBJ / PLY files (searched recursively); --captions a CSV naming each mesh
by the sha256 of its file or by its path under --meshes (TRELLIS-500K's Toys4k.csv: sha256, file_identifier and
captions, a JSON list of which one is drawn per asset with --seed). Each mesh is put in TRELLIS's unit cube, z up
(--up-axis y turns y-up files, glTF's convention, upright), rendered per the paper's protocol (gap3d.render: 8 views
every 45 degrees at pitch 30, radius 2, FoV 40, on black) and one of its yaw 0/90/180/270 views, drawn per asset, is
cropped as TRELLIS crops its input and encoded by the preset's DINOv2 (dino.path, dino.image_size): the reference
arm's condition. --cond-images DIR takes each mesh's `<file stem>.png` there instead (TRELLIS's own conditioning
renders of the dataset, in the look TRELLIS was trained on), cropped the same way unless --cond-as-given (images
already framed as the decoder's training images were, such as the miniature world's own). The layout is
gap3d.evalset's; prints evalset.json as one JSON line.
"""

import argparse
import json
import sys

from gap3d.dino import DinoTargetEncoder
from gap3d.evalset import assets_from_files, write_eval_set
from gap3d.render import Protocol
from ray_jobs.config import add_config_arguments, configure_logging, job_config_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="make-evalset", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--meshes", required=True, help="directory of mesh files (GLB/glTF/OBJ/PLY)")
    parser.add_argument("--captions", required=True, help="captions CSV (local or s3://)")
    parser.add_argument("--out", required=True, help="output directory (local or s3://)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many assets (the paper: 1250)")
    parser.add_argument("--seed", type=int, default=0, help="draws each asset's caption and conditioning view")
    parser.add_argument("--up-axis", choices=("y", "z"), default="y", help="the files' up axis (glTF: y)")
    parser.add_argument("--resolution", type=int, default=Protocol.resolution, help="render side in pixels")
    parser.add_argument("--shard-size", type=int, default=64, help="assets per Parquet shard")
    parser.add_argument("--cond-images", default=None, help="directory of <mesh stem>.png conditioning images")
    parser.add_argument(
        "--cond-as-given",
        action="store_true",
        help="encode the --cond-images as they are (only resized), not cropped as TRELLIS crops its input: for images "
        "already in the look the decoder was trained on",
    )
    add_config_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cond_as_given and not args.cond_images:
        raise SystemExit("make-evalset: --cond-as-given needs --cond-images")
    configure_logging()
    config, _ = job_config_from_args(args, {})
    dino = DinoTargetEncoder.from_pretrained(config.dino)
    assets = assets_from_files(args.meshes, args.captions, args.seed, args.limit, args.up_axis, args.cond_images)
    manifest = write_eval_set(
        args.out,
        assets,
        Protocol(resolution=args.resolution),
        dino,
        config.dino.path,
        args.seed,
        args.shard_size,
        crop_cond_images=not args.cond_as_given,
    )
    sys.stdout.write(json.dumps(manifest) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
