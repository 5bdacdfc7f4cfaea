"""The embedded default: the whole GAP3D mission on one machine with the tiny preset.

synthetic world -> Ray Data preprocessing -> Ray Train + DeepSpeed (2 workers, held-out evals along the way)
-> evaluation on held-out shape x colour pairs (per shape and per colour: the attribute probe on the tokens from the
captions, and the 3D structures the tiny TRELLIS decodes from true and from generated tokens) -> pictures
(alignment.png, learning_curve.png) -> `serve run serve/config.yaml` (with a Redis broker for async jobs) -> every
scored held-out prompt generated over HTTP, one through the async job route -> the returned assets scored per shape
and colour -> assets.png (one held-out pair per shape: prompt, ground truth, the GLB the service returned) -> the
paper's Table 3 (FD / KD of renders) on held-out objects, as the 3D evaluation job computes it. Run as
`python -m cli demo [--workdir DIR]`. Artifacts land where serve/config.yaml expects them by default
(~/.cache/gap3d/demo), so `serve run serve/config.yaml` works afterwards.
"""

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import ray

from cli.broker import start_redis
from cli.demo_service import ServedAsset, generate_held_out, score_served, start_service
from cli.table3_miniature import run_miniature_table3
from gap3d import storage
from gap3d.build import derive_shapes
from gap3d.export import find_export_dir
from gap3d.features.store import load_rows
from gap3d.trellis.mesh_export import load_mesh
from miniature.checkpoints import tiny_checkpoint
from miniature.pictures import alignment_figure, assets_figure, fit_pca, learning_curve_figure
from miniature.shards import write_synth
from miniature.world import ATTRIBUTES, render_in_scene, render_scene, sample_scene
from ray_jobs.config import add_config_arguments, configure_logging, job_config_from_args
from ray_jobs.evaluate import Evaluation, run_evaluation
from ray_jobs.preprocess import run_preprocess
from ray_jobs.train import TRAIN_SECTIONS, run_training, trained_checkpoint
from ray_jobs.train_worker import EVALS_NAME
from serve.launch import free_port
from serve.proxy_guard import CALLBACK, CALLBACK_ENV

logger = logging.getLogger("gap3d.demo")

PICTURE_ROWS = 8  # held-out prompts drawn in alignment.png
SCORED_PER_PAIR = 4  # held-out captions per shape x colour pair generated over HTTP and scored
CONCURRENT_REQUESTS = 2  # generations in flight: the Decoder scales to two single-threaded replicas, one per core
TABLE3_OBJECTS = 24  # held-out objects of the Table-3 job (docs/evaluation_3d.md)


def stage(name: str, timings: dict):
    """Context manager that logs a stage and records its wall time."""

    class _Stage:
        def __enter__(self):
            logger.info("== %s", name)
            self.start = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = round(time.perf_counter() - self.start, 1)
            logger.info("== %s done in %.1f s", name, timings[name])

    return _Stage()


def run_demo(args: argparse.Namespace) -> dict:
    """Run every stage; returns the final summary."""
    config, sections = job_config_from_args(args, TRAIN_SECTIONS)
    config = derive_shapes(config)
    workdir = Path(args.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    raw, features = workdir / "raw", workdir / "features"
    timings: dict = {}
    broker = None
    # Serve's proxy stops reading a request body past the upload limit, as on a deployed cluster (serve/proxy_guard.py).
    os.environ.setdefault(CALLBACK_ENV, CALLBACK)
    # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner polls every second (without it,
    # a warning a second); workers log training progress to the driver.
    ray.init(num_cpus=4, include_dashboard=True, dashboard_port=free_port(), log_to_driver=True)
    try:
        with stage("synthetic data", timings):
            # Rendered at the encoder's input size: real shards come larger and get resized, which only costs time.
            synth = write_synth(
                str(raw), args.num_samples, args.seed, image_size=config.dino.image_size, workers=os.cpu_count() or 1
            )
        with stage("preprocessing (Ray Data)", timings):
            preprocess = run_preprocess(config, sections["encode"], str(raw), str(features))
        with stage("training (Ray Train + DeepSpeed)", timings):
            checkpoint = train_and_export(config, sections["scaling"], raw, features, workdir)
        with stage("evaluation on held-out attribute pairs", timings):
            evaluation = run_evaluation(
                str(workdir / "export"),
                str(features / "eval-*.parquet"),
                train_features=str(features / "train-*.parquet"),
                trellis=str(workdir / "trellis"),
                shards=str(raw / "eval-*.tar"),
                attributes=str(raw / "synth.json"),
            )
            log_evaluation(evaluation, args.seed)
        with stage("pictures", timings):
            pictures = draw_pictures(
                config, evaluation, str(features / "train-*.parquet"), checkpoint, workdir, args.seed
            )
        with stage("serving (Ray Serve): held-out prompts -> assets over HTTP", timings):
            broker_port = free_port()
            broker = start_redis(broker_port)
            base = start_service(workdir, args.port, f"redis://127.0.0.1:{broker_port}/0")
            rows = rows_per_pair(evaluation.eval_set.keys, args.seed, SCORED_PER_PAIR)
            served = generate_held_out(base, evaluation.eval_set, rows, workdir / "assets", CONCURRENT_REQUESTS)
        with stage("scoring the served assets", timings):
            resolution = evaluation.report["structure"]["resolution"]
            service = score_served(served, evaluation.eval_set, str(raw / "eval-*.tar"), resolution)
            logger.info("served assets %s", json.dumps(per_class(service)))
            pictures["assets"] = str(
                draw_assets(config, served, evaluation.eval_set, args.seed, workdir / "assets.png")
            )
        with stage("Table 3: the paper's 3D generation metrics on held-out objects (Ray Data)", timings):
            table3 = run_miniature_table3(
                workdir,
                str(workdir / "export"),
                str(workdir / "trellis"),
                config,
                seed=args.seed,
                num_samples=args.num_samples,
                limit=TABLE3_OBJECTS,
            )
            logger.info("table 3 %s", json.dumps(table3["arms"]))
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        if broker is not None:
            broker.terminate()
    report = evaluation.report
    return {
        "workdir": str(workdir),
        "samples": synth["counts"],
        "preprocess": {k: preprocess[k] for k in ("rows_in", "rows_written", "skipped") if k in preprocess},
        "checkpoint": checkpoint,
        "alignment": {name: report[name] for name in ("trained", "untrained", "mean_target")},
        "attributes": report["attributes"],
        "structure": report["structure"],
        "service": service,
        "table3": {key: table3[key] for key in ("arms", "ground_truth", "assets", "contact_sheet")},
        "chance": chance_levels(report["samples"]),
        "pictures": pictures,
        "assets": [asset.summary() for asset in served],
        "seconds": timings,
    }


def train_and_export(config, scaling, raw: Path, features: Path, workdir: Path) -> str:
    """Train on the preprocessed features under `workdir`/checkpoints; copy the export and the tiny TRELLIS to where
    serve/config.yaml expects them. Returns the trained checkpoint."""
    runs = str(workdir / "checkpoints")
    result = run_training(
        config,
        scaling,
        runs,
        features=str(features / "train-*.parquet"),
        eval_features=str(features / "eval-*.parquet"),
        name="demo",
        max_failures=1,
        attributes=str(raw / "synth.json"),
    )
    checkpoint = trained_checkpoint(result, runs)
    for name, source in (("export", find_export_dir(checkpoint)), ("trellis", tiny_checkpoint("trellis"))):
        shutil.rmtree(workdir / name, ignore_errors=True)
        shutil.copytree(source, workdir / name)
    return checkpoint


def per_class(service: dict) -> dict:
    """The served assets' figures per class, for the log."""
    return {
        "shape": service["shape"]["per_class"],
        "color": service["color"]["per_class"],
        "iou_per_shape": {k: round(v, 3) for k, v in service["iou_per_shape"].items()},
        **{f"{name} (tokens)": report["per_class"] for name, report in service["tokens"].items()},
    }


def log_evaluation(evaluation: Evaluation, seed: int) -> None:
    """The alignment metrics, per-class attribute and structure figures, and one held-out prompt per pair."""
    report = evaluation.report
    for name in ("trained", "untrained", "mean_target"):
        logger.info("%s %s", name, json.dumps({k: round(v, 3) for k, v in report[name].items()}))
    for source, attributes in report["attributes"].items():
        logger.info("attributes %s %s", source, json.dumps({k: v["per_class"] for k, v in attributes.items()}))
    for source in ("from_true_tokens", "from_captions"):
        structure = report["structure"][source]
        logger.info(
            "3D structure %s: shape %s, IoU %s",
            source,
            json.dumps(structure["shape"]["per_class"]),
            json.dumps({k: round(v, 3) for k, v in structure["iou_per_shape"].items()}),
        )
    eval_set = evaluation.eval_set
    logger.info("%-26s %-26s %s", "held-out caption", "retrieved caption", "predicted attributes")
    for row in rows_per_pair(eval_set.keys, seed, 1):
        entry = report["table"][row]
        logger.info("%-26s %-26s %s", eval_set.captions[row], entry["retrieved"], " ".join(entry["predicted"].values()))


def chance_levels(rows: int) -> dict[str, float]:
    """What a prompt-blind generator scores on the held-out metrics."""
    return {
        "eval_centred_recall@5": min(1.0, 5 / rows),
        "eval_prompt_cosine_mean": 0.0,
        **{f"eval_{name}_accuracy": 1 / len(values) for name, values in ATTRIBUTES.items()},
    }


def rows_per_pair(keys: list[str], seed: int, count: int) -> list[int]:
    """Indices of the first `count` eval rows of each shape x colour pair, in row order."""
    chosen, seen = [], {}
    for row, key in enumerate(keys):
        scene = sample_scene(seed, int(key))
        pair = (scene.shape, scene.color)
        if seen.get(pair, 0) < count:
            seen[pair] = seen.get(pair, 0) + 1
            chosen.append(row)
    return chosen


def draw_pictures(
    config, evaluation: Evaluation, train_features: str, checkpoint: str, workdir: Path, seed: int
) -> dict:
    """alignment.png (renders, true and generated tokens as PCA-RGB) and learning_curve.png (periodic evals)."""
    eval_set, special = evaluation.eval_set, config.aligner.num_special_tokens
    train_targets = load_rows(train_features, config, limit=256)[0].dino
    basis = fit_pca(train_targets[:, special:].reshape(-1, train_targets.shape[-1]))
    rows = [
        {
            "caption": eval_set.captions[row],
            "retrieved": evaluation.report["table"][row]["retrieved"],
            "image": render_scene(sample_scene(seed, int(eval_set.keys[row])), config.dino.image_size),
            "target": eval_set.batch.dino[row],
            "generated": evaluation.generated[row],
        }
        for row in rows_per_pair(eval_set.keys, seed, 1)[:PICTURE_ROWS]
    ]
    alignment = alignment_figure(rows, basis, config.aligner.grid_size, special, workdir / "alignment.png")
    fs, root = storage.filesystem(checkpoint)
    history = json.loads(fs.cat_file(storage.join(root, EVALS_NAME)))
    curve = learning_curve_figure(history, chance_levels(len(eval_set.captions)), workdir / "learning_curve.png")
    logger.info("wrote %s and %s", alignment, curve)
    return {"alignment": str(alignment), "learning_curve": str(curve), "history": history}


def draw_assets(config, served: list[ServedAsset], eval_set, seed: int, path: Path) -> Path:
    """assets.png: one row per shape, each a held-out pair: the prompt, the held-out object its caption came from,
    and a render of the GLB the service returned, seen from that object's camera, in its vertex colours (grey when
    the decoder ran stage 1 alone)."""
    rows, shown = [], set()
    for asset in served:
        scene = sample_scene(seed, int(eval_set.keys[asset.row]))
        if scene.shape in shown:
            continue
        shown.add(scene.shape)
        mesh = load_mesh(asset.path.read_bytes())
        colors = mesh.visual.vertex_colors[:, :3] / 255.0 if mesh.visual.kind == "vertex" else (0.7, 0.7, 0.7)
        image = render_in_scene(mesh.vertices, mesh.faces, scene, 2 * config.dino.image_size, colors)
        rows.append({"prompt": asset.prompt, "truth": render_scene(scene, 2 * config.dino.image_size), "asset": image})
    return assets_figure(rows, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir",
        default=str(storage.cache_root() / "demo"),
        help="where data, checkpoints and GLB files go (serve/config.yaml's default)",
    )
    parser.add_argument("--num-samples", type=int, default=1000, help="synthetic image-caption pairs (train + eval)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the demo's Serve proxy on 127.0.0.1")
    add_config_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    summary = run_demo(parse_args(argv))
    sys.stdout.write(json.dumps(summary, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
