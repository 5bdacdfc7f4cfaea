"""`gap3d trellis ...` commands: write a tiny random TRELLIS checkpoint (both stages, or stage 1 only)."""

import argparse


def _make_tiny(args: argparse.Namespace) -> None:
    from gap3d.trellis.factory import write_tiny_trellis  # torch stays out of `gap3d --help`

    write_tiny_trellis(args.out, cond_dim=args.cond_dim, seed=args.seed, steps=args.steps, stage2=not args.coarse_only)


def register(subparsers: argparse._SubParsersAction) -> None:
    """`gap3d trellis make-tiny --out DIR`: a tiny random TRELLIS checkpoint in the release layout."""
    trellis = subparsers.add_parser("trellis", help="TRELLIS decoder utilities")
    commands = trellis.add_subparsers(dest="trellis_command", metavar="COMMAND", required=True)
    parser = commands.add_parser("make-tiny", help="write a tiny random TRELLIS checkpoint (pipeline.json + ckpts/)")
    parser.add_argument("--out", required=True, help="directory to write pipeline.json and ckpts/ into")
    parser.add_argument("--cond-dim", type=int, default=64, help="feature size of the condition tokens (the tiny DINOv2's hidden size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--steps", type=int, default=4, help="sampler steps written to pipeline.json")
    parser.add_argument("--coarse-only", action="store_true", help="write only the stage-1 models (no structured-latent flow / mesh decoder)")
    parser.set_defaults(func=_make_tiny)
