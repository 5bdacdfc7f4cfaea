"""Held-out alignment of a trained aligner against an untrained one; prints one JSON object.

    python -m ray_jobs.evaluate --checkpoint s3://bucket/runs/gap3d-train/checkpoint_00000300 --features s3://bucket/features/eval

--checkpoint is a training checkpoint (its `export/` is used) or an export directory. Both aligners sample
from the same noise; the untrained one is freshly initialised with train.seed and the initial soft tokens.
`mean_target` scores the mean of the evaluated targets given for every prompt: a prompt-blind reference
whose cosine is high wherever targets share much (backgrounds), and whose recall@k is chance.
Sampling runs on the driver (it is small next to training); pass --device cuda where a GPU is available.
"""

import argparse
import json
import logging
import sys
import time

import torch

from gap3d.build import build_aligner
from gap3d.export import apply_soft_tokens, load_export
from gap3d.features.identity import soft_token_mode
from gap3d.features.store import load_rows
from gap3d.metrics import alignment_metrics
from gap3d.prompt_encoder import PromptEncoder
from gap3d.training import evaluate_alignment, evaluation_condition
from ray_jobs.config import configure_logging

logger = logging.getLogger("gap3d.evaluate")


def evaluate(checkpoint: str, features: str, limit: int | None = None, device: str = "cpu", seed: int = 0) -> dict:
    """{"trained", "untrained", "mean_target": metrics, "samples", "step", ...} on up to `limit` rows of `features`."""
    start = time.perf_counter()
    device = torch.device(device)
    export = load_export(checkpoint, device)
    config = export.config
    batch, _ = load_rows(features, config, limit=limit)
    prompt_encoder = PromptEncoder.from_pretrained(config.vlm, device) if soft_token_mode(config) == "prompt_cache" else None
    untrained_cond = evaluation_condition(batch, prompt_encoder, device)
    if prompt_encoder is not None:
        apply_soft_tokens(prompt_encoder, export.soft_tokens)
    trained_cond = evaluation_condition(batch, prompt_encoder, device)
    untrained = build_aligner(config, seed=config.train.seed).to(device)
    return {
        "checkpoint": checkpoint,
        "features": features,
        "step": export.step,
        "samples": len(batch),
        "sample_steps": config.flow.sample_steps,
        "cfg_scale": config.flow.cfg_scale,
        "trained": evaluate_alignment(export.aligner, trained_cond, batch.dino, config.flow, seed=seed),
        "untrained": evaluate_alignment(untrained, untrained_cond, batch.dino, config.flow, seed=seed),
        # A prompt-blind constant: what an aligner must beat to show that it uses the prompt.
        "mean_target": alignment_metrics(batch.dino.mean(0, keepdim=True).expand_as(batch.dino), batch.dino),
        "seconds": round(time.perf_counter() - start, 3),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="evaluate", description="Compare a trained aligner with an untrained one on held-out features.")
    parser.add_argument("--checkpoint", required=True, help="training checkpoint or export directory (local or s3://)")
    parser.add_argument("--features", required=True, help="held-out feature directory (local or s3://)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most this many rows")
    parser.add_argument("--device", default="cpu", help="torch device for sampling")
    parser.add_argument("--seed", type=int, default=0, help="sampling noise seed (shared by both aligners)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    sys.stdout.write(json.dumps(evaluate(args.checkpoint, args.features, args.limit, args.device, args.seed)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
