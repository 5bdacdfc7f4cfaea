"""Seconds-long check of the prompt path: prompt -> VLM soft-token latents -> (untrained) aligner -> DINOv2-space
tokens.

    python -m cli smoke [--prompt TEXT ...] [--preset tiny] [key.sub=value ...]

Prints one JSON line: the condition and token shapes, whether the tokens are finite, and the time taken.
"""

import argparse
import json
import logging
import sys
import time

import torch

from gap3d.build import build_aligner, build_encoders, derive_shapes
from gap3d.flow import sample
from ray_jobs.config import add_config_arguments, configure_logging, job_config_from_args

logger = logging.getLogger("gap3d.smoke")

DEFAULT_PROMPTS = ("a red cone", "a blue cube")


def run_smoke(config, prompts: list[str], seed: int) -> dict:
    """Generate aligned tokens for each prompt with an untrained aligner; returns the summary."""
    start = time.perf_counter()
    config = derive_shapes(config)
    prompt_encoder, _ = build_encoders(config)
    aligner = build_aligner(config, seed=seed).eval()
    with torch.no_grad():
        cond = prompt_encoder(prompts)  # (B, s, d_vlm)
        tokens = sample(
            aligner,
            cond,
            (config.aligner.num_tokens, config.aligner.token_dim),
            config.flow.sample_steps,
            config.flow.cfg_scale,
            config.flow.solver,
            torch.Generator().manual_seed(seed),
        )  # (B, N, D)
    return {
        "prompts": prompts,
        "condition_shape": list(cond.shape),
        "tokens_shape": list(tokens.shape),
        "tokens_finite": bool(torch.isfinite(tokens).all()),
        "token_norm_mean": tokens.norm(dim=-1).mean().item(),
        "seconds": round(time.perf_counter() - start, 3),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="smoke", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompt", action="append", default=None, help="prompt text (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and sampling noise")
    add_config_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    config, _ = job_config_from_args(args, {})
    summary = run_smoke(config, args.prompt or list(DEFAULT_PROMPTS), args.seed)
    logger.info("smoke generation done (untrained aligner: shapes and plumbing only)")
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
