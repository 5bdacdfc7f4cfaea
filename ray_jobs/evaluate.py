"""Held-out alignment of a trained aligner against an untrained one; prints one JSON object.

    python ray_jobs/evaluate.py --checkpoint s3://bucket/runs/gap3d-train --features s3://bucket/features/eval \
        [--train-features s3://bucket/features/train --attributes s3://bucket/raw/synth.json]

--checkpoint is a training checkpoint (its `export/` is used), a run directory (its newest checkpoint is used) or an
export directory. Both aligners sample from the same noise; the untrained one is freshly initialised with
train.seed and the initial soft tokens.
`mean_target` scores the mean of the evaluated targets given for every prompt: a prompt-blind reference
whose cosine is high wherever targets share much (backgrounds), whose prompt-specific cosine is 0 and whose
recall@k is chance. With --train-features and --attributes (a vocabulary of attributes the captions name, such as
the synthetic world's synth.json), attribute accuracy of a linear probe fit on the true training targets is reported
too, and `table` lists each
held-out caption with the caption retrieved by its generated tokens and the attributes the probe reads from them.
With --trellis (a TRELLIS release) and --shards (the held-out raw shards, which carry each object's occupancy grid,
as the synthetic world's do), `structure` reports stage-1 occupancy IoU against the ground truth and shape accuracy
by nearest ground-truth grid, decoded from the rows' true DINOv2 tokens and from the tokens generated from their
captions. Sampling runs on the driver (it is small next to training); pass --device cuda where a GPU is available.

`paper_tables` gives the paper's Tables 1 and 2 for the trained aligner and the mean target (gap3d.metrics.
paper_tables): cosine, MSE and norm ratio (mean and std over rows) apart for the patch tokens, the CLS token and the
registers, and caption-to-image recall@1/5/10 in percent with the "pooled" (patch grid averaged) and "summary" (CLS)
embeddings. The paper samples with 30 steps at CFG 3.0, the `paper` preset's flow.sample_steps and flow.cfg_scale.
"""

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from gap3d.build import build_aligner
from gap3d.data.occupancy import downsample, read_occupancy
from gap3d.evaluation import (
    EvalSet,
    evaluate_alignment,
    evaluation_condition,
    generate_tokens,
    load_eval_set,
    read_vocabulary,
)
from gap3d.export import apply_soft_tokens, load_export
from gap3d.features.identity import soft_token_mode
from gap3d.metrics import alignment_metrics, nearest_targets, paper_tables
from gap3d.prompt_encoder import PromptEncoder
from gap3d.trellis.structure_metrics import structure_metrics
from ray_jobs.config import configure_logging
from ray_jobs.run_checkpoints import newest_valid_checkpoint

logger = logging.getLogger("gap3d.evaluate")

DECODE_CHUNK = 64  # structures sampled at a time


@dataclass
class Evaluation:
    """What an evaluation computed: the JSON report, and the held-out rows with the trained aligner's tokens."""

    report: dict
    eval_set: EvalSet
    generated: torch.Tensor  # (B, N, D) tokens the trained aligner generated from the held-out rows' conditions


def evaluate(
    checkpoint: str,
    features: str,
    limit: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    train_features: str | None = None,
    trellis: str | None = None,
    shards: str | None = None,
    attributes: str | None = None,
) -> dict:
    """{"trained", "untrained", "mean_target": metrics, "table", "samples", "step", ["structure"]} on up to `limit`
    rows of `features`."""
    return run_evaluation(checkpoint, features, limit, device, seed, train_features, trellis, shards, attributes).report


def run_evaluation(
    checkpoint: str,
    features: str,
    limit: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    train_features: str | None = None,
    trellis: str | None = None,
    shards: str | None = None,
    attributes: str | None = None,
) -> Evaluation:
    """`evaluate`, keeping the held-out rows and the generated tokens (for pictures)."""
    if (trellis is None) != (shards is None):
        raise ValueError(
            "structure evaluation needs both --trellis (a TRELLIS release) and --shards (raw shards with occupancy)"
        )
    start = time.perf_counter()
    device = torch.device(device)
    checkpoint = (
        newest_valid_checkpoint(checkpoint) or checkpoint
    )  # a run directory stands for its newest valid checkpoint
    export = load_export(checkpoint, device)
    config = export.config
    eval_set = load_eval_set(
        features, config, limit, train_features, read_vocabulary(attributes) if attributes else None
    )
    batch = eval_set.batch
    prompt_encoder = (
        PromptEncoder.from_pretrained(config.vlm, device) if soft_token_mode(config) == "prompt_cache" else None
    )
    untrained_cond = evaluation_condition(batch, prompt_encoder, device)
    if prompt_encoder is not None:
        apply_soft_tokens(prompt_encoder, export.soft_tokens)
    trained_cond = evaluation_condition(batch, prompt_encoder, device)
    untrained = build_aligner(config, seed=config.train.seed).to(device)
    mean_target = batch.dino.mean(0, keepdim=True).expand_as(batch.dino)
    generated = generate_tokens(export.aligner, trained_cond, config.flow, seed).cpu()
    report = {
        "checkpoint": checkpoint,
        "features": features,
        "step": export.step,
        "samples": len(batch),
        "sample_steps": config.flow.sample_steps,
        "cfg_scale": config.flow.cfg_scale,
        "trained": alignment_metrics(generated, batch.dino, eval_set.probe, eval_set.labels),
        "untrained": evaluate_alignment(untrained, untrained_cond, eval_set, config.flow, seed=seed),
        # A prompt-blind constant: what an aligner must beat to show that it uses the prompt.
        "mean_target": alignment_metrics(mean_target, batch.dino, eval_set.probe, eval_set.labels),
        "table": held_out_table(eval_set, generated),
        # Tables 1 and 2 as the paper reports them: alignment per token group, pooled / summary retrieval (percent).
        "paper_tables": {
            "trained": paper_tables(generated, batch.dino, config.aligner.num_special_tokens),
            "mean_target": paper_tables(mean_target, batch.dino, config.aligner.num_special_tokens),
        },
    }
    if eval_set.probe is not None:
        # Per attribute value and confusions: what the probe reads from the true held-out tokens (its own ceiling)
        # and from the tokens generated from their captions.
        report["attributes"] = {
            "from_true_tokens": eval_set.probe.report(batch.dino, eval_set.labels),
            "from_captions": eval_set.probe.report(generated, eval_set.labels),
        }
    if trellis is not None:
        report["structure"] = structure_report(trellis, shards, eval_set, generated, str(device))
    report["seconds"] = round(time.perf_counter() - start, 3)
    return Evaluation(report, eval_set, generated)


def structure_report(
    trellis: str, shards: str, eval_set: EvalSet, generated: torch.Tensor, device: str = "cpu"
) -> dict:
    """{"from_true_tokens", "from_captions": gap3d.trellis.structure_metrics, "rows", "resolution"} of stage-1
    structures decoded from the held-out rows' true and generated tokens, against the occupancy in `shards`."""
    from gap3d.trellis.decoder import Decoder

    start = time.perf_counter()
    decoder = Decoder.from_pretrained(trellis, device=device, stages="coarse")
    resolution = decoder.structure_resolution
    grids = read_occupancy(shards, set(eval_set.keys))
    missing = [key for key in eval_set.keys if key not in grids]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} held-out rows have no <key>.occupancy.npy in {shards} (e.g. key {missing[0]!r}); pass the "
            "raw shards they came from"
        )
    target = torch.from_numpy(np.stack([downsample(grids[key], resolution) for key in eval_set.keys]))
    shapes = eval_set.labels["shape"] if eval_set.labels and "shape" in eval_set.labels else None
    report = {"rows": len(eval_set.keys), "resolution": resolution}
    for name, tokens in (("from_true_tokens", eval_set.batch.dino), ("from_captions", generated)):
        chunks = [tokens[i : i + DECODE_CHUNK] for i in range(0, len(tokens), DECODE_CHUNK)]
        decoded = torch.cat(
            [
                decoder.sample_sparse_structure(
                    chunk, seed=list(range(i * DECODE_CHUNK, i * DECODE_CHUNK + len(chunk)))
                ).occupancy.cpu()
                for i, chunk in enumerate(chunks)
            ]
        )  # (B, R, R, R) bool
        metrics = structure_metrics(
            decoded, target, shapes or ["?"] * len(target), target, shapes or ["?"] * len(target)
        )
        report[name] = metrics if shapes else {k: v for k, v in metrics.items() if k in ("iou", "voxels")}
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


def held_out_table(eval_set: EvalSet, generated: torch.Tensor) -> list[dict]:
    """Per held-out row: its caption, the caption of the target its tokens retrieve first, and the probe's reading."""
    retrieved = nearest_targets(generated, eval_set.batch.dino, mean=eval_set.batch.dino.mean(0))
    predicted = eval_set.probe.predict(generated) if eval_set.probe is not None else {}
    return [
        {
            "caption": caption,
            "retrieved": eval_set.captions[index],
            "predicted": {name: values[row] for name, values in predicted.items()},
        }
        for row, (caption, index) in enumerate(zip(eval_set.captions, retrieved))
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="evaluate", description="Compare a trained aligner with an untrained one on held-out features."
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="training checkpoint, run directory (its newest checkpoint) or export directory (local or s3://)",
    )
    parser.add_argument("--features", required=True, help="held-out feature directory (local or s3://)")
    parser.add_argument(
        "--train-features", default=None, help="training features: fit the attribute probe on their targets"
    )
    parser.add_argument(
        "--attributes",
        default=None,
        help="JSON whose `attributes` maps each attribute the captions name to its values "
        "(the synthetic world's synth.json): report attribute accuracy and the per-row table",
    )
    parser.add_argument(
        "--trellis", default=None, help="TRELLIS release: also score stage-1 structures (needs --shards)"
    )
    parser.add_argument(
        "--shards", default=None, help="raw held-out shards with <key>.occupancy.npy (the synthetic world's)"
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most this many rows")
    parser.add_argument("--device", default="cpu", help="torch device for sampling")
    parser.add_argument("--seed", type=int, default=0, help="sampling noise seed (shared by both aligners)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    report = evaluate(
        args.checkpoint,
        args.features,
        args.limit,
        args.device,
        args.seed,
        args.train_features,
        args.trellis,
        args.shards,
        args.attributes,
    )
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
