"""Write a tiny TRELLIS checkpoint in the release layout (pipeline.json + ckpts/): random, for tests, or trained.

    python -m cli make-tiny --out DIR [--cond-dim 64] [--steps 4] [--coarse-only]
    python -m cli make-tiny --trained --out miniature/checkpoints/tiny_trellis   # rebuild the shipped tiny://trellis
    python -m cli make-tiny --rescore --out miniature/checkpoints/tiny_trellis   # after a change of its samplers

--trained runs the shipped release's recipe (miniature/checkpoints/trained_trellis.py; an hour or more on 2 cores).
--rescore writes the recipe's samplers into a release it trained and scores it again (minutes): no retraining.
The tiny VLM and DINOv2 need no command: the tiny preset names them tiny://vlm and tiny://dino, built on first use.
"""

import argparse

from miniature.checkpoints.trained_trellis import rescore_release, write_trained_tiny_trellis
from miniature.checkpoints.trellis import write_tiny_trellis
from ray_jobs.config import configure_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="make-tiny", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="directory to write pipeline.json and ckpts/ into")
    parser.add_argument(
        "--cond-dim", type=int, default=64, help="feature size of the condition tokens (the tiny DINOv2's hidden size)"
    )
    parser.add_argument(
        "--trained", action="store_true", help="train both stages on the synthetic world (the shipped tiny://trellis)"
    )
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="write the recipe's samplers into the trained release at --out and score it again on held-out objects",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--steps", type=int, default=4, help="sampler steps written to pipeline.json")
    parser.add_argument(
        "--coarse-only",
        action="store_true",
        help="write only the stage-1 models (no structured-latent flow / mesh decoder)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    if args.trained and args.rescore:
        raise SystemExit("make-tiny: --trained builds a release and scores it; --rescore only re-scores one: pick one")
    if args.trained:
        write_trained_tiny_trellis(args.out)
    elif args.rescore:
        rescore_release(args.out)
    else:
        write_tiny_trellis(
            args.out, cond_dim=args.cond_dim, seed=args.seed, steps=args.steps, stage2=not args.coarse_only
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
