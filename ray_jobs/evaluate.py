"""Held-out alignment of a trained aligner against an untrained one; prints one JSON object.

    python -m ray_jobs.evaluate --checkpoint s3://bucket/runs/gap3d-train/checkpoint_00000300 --features s3://bucket/features/eval \
        [--train-features s3://bucket/features/train]

--checkpoint is a training checkpoint (its `export/` is used) or an export directory. Both aligners sample
from the same noise; the untrained one is freshly initialised with train.seed and the initial soft tokens.
`mean_target` scores the mean of the evaluated targets given for every prompt: a prompt-blind reference
whose cosine is high wherever targets share much (backgrounds), whose prompt-specific cosine is 0 and whose
recall@k is chance. With --train-features and captions that name their attributes (the synthetic world),
attribute accuracy of a linear probe fit on the true training targets is reported too, and `table` lists each
held-out caption with the caption retrieved by its generated tokens and the attributes the probe reads from them.
Sampling runs on the driver (it is small next to training); pass --device cuda where a GPU is available.
"""

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass

import torch

from gap3d.build import build_aligner
from gap3d.evaluation import EvalSet, evaluate_alignment, evaluation_condition, generate_tokens, load_eval_set
from gap3d.export import apply_soft_tokens, load_export
from gap3d.features.identity import soft_token_mode
from gap3d.metrics import alignment_metrics, nearest_targets
from gap3d.prompt_encoder import PromptEncoder
from ray_jobs.config import configure_logging

logger = logging.getLogger("gap3d.evaluate")


@dataclass
class Evaluation:
    """What an evaluation computed: the JSON report, and the held-out rows with the trained aligner's tokens."""

    report: dict
    eval_set: EvalSet
    generated: torch.Tensor  # (B, N, D) tokens the trained aligner generated from the held-out rows' conditions


def evaluate(checkpoint: str, features: str, limit: int | None = None, device: str = "cpu", seed: int = 0, train_features: str | None = None) -> dict:
    """{"trained", "untrained", "mean_target": metrics, "table", "samples", "step", ...} on up to `limit` rows of `features`."""
    return run_evaluation(checkpoint, features, limit, device, seed, train_features).report


def run_evaluation(checkpoint: str, features: str, limit: int | None = None, device: str = "cpu", seed: int = 0, train_features: str | None = None) -> Evaluation:
    """`evaluate`, keeping the held-out rows and the generated tokens (for pictures)."""
    start = time.perf_counter()
    device = torch.device(device)
    export = load_export(checkpoint, device)
    config = export.config
    eval_set = load_eval_set(features, config, limit, train_features)
    batch = eval_set.batch
    prompt_encoder = PromptEncoder.from_pretrained(config.vlm, device) if soft_token_mode(config) == "prompt_cache" else None
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
    }
    report["seconds"] = round(time.perf_counter() - start, 3)
    return Evaluation(report, eval_set, generated)


def held_out_table(eval_set: EvalSet, generated: torch.Tensor) -> list[dict]:
    """Per held-out row: its caption, the caption of the target its tokens retrieve first, and the probe's reading."""
    retrieved = nearest_targets(generated, eval_set.batch.dino, mean=eval_set.batch.dino.mean(0))
    predicted = eval_set.probe.predict(generated) if eval_set.probe is not None else {}
    return [
        {"caption": caption, "retrieved": eval_set.captions[index], "predicted": {name: values[row] for name, values in predicted.items()}}
        for row, (caption, index) in enumerate(zip(eval_set.captions, retrieved))
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="evaluate", description="Compare a trained aligner with an untrained one on held-out features.")
    parser.add_argument("--checkpoint", required=True, help="training checkpoint or export directory (local or s3://)")
    parser.add_argument("--features", required=True, help="held-out feature directory (local or s3://)")
    parser.add_argument("--train-features", default=None, help="training features: fit the attribute probe on their targets")
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most this many rows")
    parser.add_argument("--device", default="cpu", help="torch device for sampling")
    parser.add_argument("--seed", type=int, default=0, help="sampling noise seed (shared by both aligners)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    sys.stdout.write(json.dumps(evaluate(args.checkpoint, args.features, args.limit, args.device, args.seed, args.train_features)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
