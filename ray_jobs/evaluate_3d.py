"""Table 3 of the paper as a Ray job: 3D generation from captions against the ground truth, FD / KD / CLIP.

    python ray_jobs/evaluate_3d.py --checkpoint s3://bucket/runs/paper --trellis microsoft/TRELLIS-image-large \
        --eval-set s3://bucket/evalsets/toys4k --out s3://bucket/reports/table3 --preset paper \
        [table3.trellis_text=microsoft/TRELLIS-text-xlarge] [table3.untrained_arm=true] [--limit N] [--seed S]

For every object of the evaluation set (gap3d.evalset; `python -m cli make-evalset` builds one) and its caption,
one asset per arm, all from the same seed (the set's seed + the object's index): `reference`, TRELLIS-image
conditioned on the true DINOv2 tokens of one ground-truth view; `gap3d`, TRELLIS conditioned on the tokens the
aligner generates from the caption (the export's flow.sample_steps and flow.cfg_scale: 30 and 3.0 at the paper
preset); optionally `untrained` (a freshly initialised aligner and the initial soft tokens) and `trellis_text`
(a TRELLIS-text release, table3.trellis_text). Each asset and its ground truth are rendered per the paper's protocol
(gap3d.render: black, FoV 40, radius 2, pitch 30; yaws 0/90/180/270 for FD and KD, every 45 degrees for CLIP);
an empty asset renders black and counts. Generation and rendering, then feature extraction, fan out over Ray Data
actors (table3.actors, table3.num_gpus); the metrics gather on the driver (gap3d.fidelity).

Writes <out>/table3.json (printed as one JSON line too) and <out>/contact_sheet.png (caption, ground truth, each
arm, view 0). The renders are of coloured meshes; the authors render TRELLIS's Gaussians.
"""

import argparse
import io
import json
import logging
import sys
import textwrap
import time

import numpy as np

from gap3d import storage
from gap3d.evalset import read_manifest, shard_uris
from gap3d.fidelity import clip_score, distances
from ray_jobs.config import add_config_arguments, configure_logging, job_config_from_args
from ray_jobs.run_checkpoints import newest_valid_checkpoint
from ray_jobs.table3_stages import TABLE3_SECTION, THUMBNAIL, ExtractFeatures, GenerateArms, Table3Settings

logger = logging.getLogger("gap3d.evaluate_3d")

REPORT_NAME, SHEET_NAME = "table3.json", "contact_sheet.png"
NOTES = {
    "renders": "coloured meshes rendered by gap3d.render (vertex colours under a head-light, supersampled); the "
    "authors render TRELLIS's Gaussians, so absolute figures are not the paper's",
    "fd": "torchmetrics FrechetInceptionDistance on precomputed features (sample covariances, float64)",
    "kd": "torchmetrics KernelInceptionDistance, one subset of all samples: unbiased MMD^2, kernel (x.y/d + 1)^3, x100",
    "clip_score": "100 x mean over assets of the mean view cosine with the caption; computed here (torchmetrics' "
    "CLIPScore clips cosines at 0)",
    "inception": "gap3d.inception: torchvision's Inception-v3 pool features, architecture written here",
    "dinov2": "transformers AutoModel pooler_output (CLS after the final norm)",
}


def run_table3(
    checkpoint: str,
    trellis: str,
    eval_set: str,
    out: str,
    settings: Table3Settings,
    limit: int | None = None,
    seed: int | None = None,
) -> dict:
    """Generate, render, extract and score; returns the report written to <out>/table3.json. Needs a Ray cluster
    (ray.init() first). `seed` defaults to the eval set's."""
    import ray

    start = time.perf_counter()
    checkpoint = newest_valid_checkpoint(checkpoint) or checkpoint  # a run directory stands for its newest
    manifest = read_manifest(eval_set)
    seed = manifest["seed"] if seed is None else seed
    arms = settings.arms()
    filesystem, _ = storage.arrow_filesystem(eval_set)
    paths = [storage.arrow_filesystem(uri)[1] for uri in shard_uris(eval_set, manifest)]
    rows = ray.data.read_parquet(paths, filesystem=filesystem)
    if limit is not None:
        rows = rows.limit(limit)
    # Blocks of one actor batch each, so that every actor of the pool gets rows whatever the eval set's file layout
    # (a one-file eval set is one block, which one actor would take alone).
    rows = rows.repartition(target_num_rows_per_block=settings.batch_size)
    resources = {
        "compute": ray.data.ActorPoolStrategy(size=settings.actors),
        "num_cpus": settings.num_cpus,
        "num_gpus": settings.num_gpus,
        "batch_size": settings.batch_size,
    }
    rendered = rows.map_batches(
        GenerateArms,
        fn_constructor_kwargs={
            "checkpoint": checkpoint,
            "trellis": trellis,
            "settings": settings,
            "protocol": manifest["protocol"],
            "seed": seed,
        },
        batch_format="numpy",
        **resources,
    )
    features = rendered.map_batches(
        ExtractFeatures,
        fn_constructor_kwargs={"settings": settings, "arms": arms, "protocol": manifest["protocol"]},
        batch_format="numpy",
        **resources,
    )
    gathered = sorted(features.take_all(), key=lambda row: int(row["index"]))
    report = {
        "checkpoint": checkpoint,
        "trellis": trellis,
        "eval_set": eval_set,
        "assets": len(gathered),
        "seed": seed,
        "protocol": manifest["protocol"],
        "extractors": {
            "inception": settings.inception or None,
            "dinov2": settings.dino,
            "dinov2_image_size": settings.dino_image_size,
            "clip": settings.clip or None,
        },
        **table3_metrics(gathered, arms),
        "notes": NOTES,
    }
    fs, root = storage.filesystem(out)
    fs.makedirs(root, exist_ok=True)
    if settings.sheet_rows:
        storage.publish_bytes(contact_sheet(gathered[: settings.sheet_rows], arms), storage.join(out, SHEET_NAME))
        report["contact_sheet"] = storage.join(out, SHEET_NAME)
    report["seconds"] = round(time.perf_counter() - start, 1)
    storage.publish_bytes(json.dumps(report, indent=2).encode(), storage.join(out, REPORT_NAME))
    return report


def table3_metrics(rows: list[dict], arms: list[str]) -> dict:
    """{"arms": {arm: {fd_dinov2, kd_dinov2, [fd_inception, kd_inception], [clip_score], empty}}, "ground_truth":
    {[clip_score]}} from the gathered feature rows."""

    def stacked(source: str, kind: str) -> np.ndarray:
        return np.concatenate([np.asarray(row[f"{source}_{kind}"], np.float64) for row in rows])

    has = {kind: f"ground_truth_{kind}" in rows[0] for kind in ("inception", "clip")}
    result = {"arms": {}, "ground_truth": {}}
    for arm in arms:
        scores = {
            f"{name}_dinov2": value
            for name, value in distances(stacked("ground_truth", "dino"), stacked(arm, "dino")).items()
        }
        if has["inception"]:
            scores.update(
                {
                    f"{name}_inception": value
                    for name, value in distances(
                        stacked("ground_truth", "inception"), stacked(arm, "inception")
                    ).items()
                }
            )
        if has["clip"]:
            scores["clip_score"] = clip_score([row[f"{arm}_clip"] for row in rows])
        scores["empty"] = int(sum(bool(row[f"{arm}_empty"]) for row in rows))
        result["arms"][arm] = scores
    if has["clip"]:
        result["ground_truth"]["clip_score"] = clip_score([row["ground_truth_clip"] for row in rows])
    return result


def contact_sheet(rows: list[dict], arms: list[str]) -> bytes:
    """PNG: one row per asset, its caption, then view 0 of the ground truth and of each arm, labelled on top."""
    from PIL import Image, ImageDraw

    caption_width, label_height = 2 * THUMBNAIL, 20
    columns = ["ground_truth", *arms]
    sheet = Image.new("RGB", (caption_width + THUMBNAIL * len(columns), label_height + THUMBNAIL * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for column, name in enumerate(columns):
        draw.text((caption_width + column * THUMBNAIL + 4, 4), name.replace("_", " "), fill="black")
    for row_index, row in enumerate(rows):
        top = label_height + row_index * THUMBNAIL
        draw.text((4, top + THUMBNAIL // 2 - 6), _wrapped(str(row["caption"])), fill="black")
        for column, name in enumerate(columns):
            cell = Image.open(io.BytesIO(row[f"{name}_thumb"])).convert("RGB")
            sheet.paste(cell, (caption_width + column * THUMBNAIL, top))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def _wrapped(text: str, width: int = 48) -> str:
    return "\n".join(textwrap.wrap(text, width)[:4])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="evaluate-3d", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="training checkpoint, run directory or export directory")
    parser.add_argument("--trellis", required=True, help="TRELLIS-image release: hub name, local dir or s3:// URI")
    parser.add_argument("--eval-set", required=True, help="evaluation set (python -m cli make-evalset)")
    parser.add_argument("--out", required=True, help="where table3.json and contact_sheet.png go")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N objects only")
    parser.add_argument("--seed", type=int, default=None, help="generation seed base (default: the eval set's)")
    add_config_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import ray

    args = parse_args(argv)
    configure_logging()
    _, sections = job_config_from_args(args, TABLE3_SECTION)
    ray.init()
    try:
        report = run_table3(
            args.checkpoint, args.trellis, args.eval_set, args.out, sections["table3"], args.limit, args.seed
        )
    finally:
        ray.shutdown()
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
