"""`gap3d demo`: the whole tiny-preset mission on this machine (the driver is ray_jobs/demo.py).

The driver is Ray code, so it lives in ray_jobs/; this module only defines its options (shared by both entry
points) and starts it in a subprocess, which keeps gap3d free of Ray imports.
"""

import argparse
import subprocess
import sys

from gap3d.config import add_config_arguments


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the demo, for `gap3d demo` and `python -m ray_jobs.demo` alike."""
    parser.add_argument("--workdir", default="~/.cache/gap3d/demo", help="where data, checkpoints and GLB files go (serve/config.yaml's default)")
    parser.add_argument("--num-samples", type=int, default=320, help="synthetic image-caption pairs (train + eval)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the demo's Serve proxy on 127.0.0.1")
    add_config_arguments(parser)


def register(subparsers: argparse._SubParsersAction) -> None:
    """`gap3d demo [--workdir DIR] [...]`."""
    parser = subparsers.add_parser("demo", help="synthetic data -> preprocessing -> training -> evaluation -> serving -> GLB files (tiny preset)")
    add_demo_arguments(parser)
    parser.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    argv = ["--workdir", args.workdir, "--num-samples", str(args.num_samples), "--seed", str(args.seed), "--port", str(args.port)]
    argv += (["--preset", args.preset] if args.preset else []) + (["--config", args.config] if args.config else [])
    return subprocess.call([sys.executable, "-m", "ray_jobs.demo", *argv, *args.overrides])
