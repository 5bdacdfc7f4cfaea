"""`gap3d smoke`: prompt -> VLM soft-token latents -> (untrained) aligner -> DINOv2-space tokens."""

import argparse
import json
import logging
import sys
import time

logger = logging.getLogger(__name__)


def run_smoke(args: argparse.Namespace) -> int:
    """Generate aligned tokens for each prompt and log one JSON summary line."""
    import torch

    from gap3d.build import build_aligner, build_encoders
    from gap3d.config import config_from_args
    from gap3d.flow import sample
    from gap3d.tiny_models import ensure_tiny_checkpoints

    config = config_from_args(args)
    ensure_tiny_checkpoints(config)
    start = time.perf_counter()
    prompt_encoder, _ = build_encoders(config)
    aligner = build_aligner(config, seed=args.seed).eval()
    with torch.no_grad():
        cond = prompt_encoder(args.prompt)  # (B, s, d_vlm)
        tokens = sample(
            aligner, cond, (config.aligner.num_tokens, config.aligner.token_dim), config.flow.sample_steps,
            config.flow.cfg_scale, config.flow.solver, torch.Generator().manual_seed(args.seed),
        )
    summary = {
        "prompts": args.prompt,
        "condition_shape": list(cond.shape),
        "tokens_shape": list(tokens.shape),
        "tokens_finite": bool(torch.isfinite(tokens).all()),
        "token_norm_mean": tokens.norm(dim=-1).mean().item(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    logger.info("smoke generation done (untrained aligner: shapes and plumbing only)")
    sys.stdout.write(json.dumps(summary) + "\n")  # the command's result on stdout; progress goes to logging
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """`gap3d smoke`: the tiny preset's prompt -> aligned DINOv2 tokens path, end to end."""
    from gap3d.config import add_config_arguments

    parser = subparsers.add_parser("smoke", help="prompt -> VLM latents -> aligner -> DINOv2-space tokens (untrained weights)")
    parser.add_argument("--prompt", action="append", default=None, help="prompt text (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and sampling noise")
    add_config_arguments(parser)
    parser.set_defaults(func=_with_default_prompts)


def _with_default_prompts(args: argparse.Namespace) -> int:
    args.prompt = args.prompt or ["a small red cone on the left", "a large blue cube in the center"]
    return run_smoke(args)
