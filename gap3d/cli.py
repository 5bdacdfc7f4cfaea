"""The `gap3d` command line: each command module adds its own subparser through `register()`."""

import argparse
import importlib
import logging

# Modules that define `register(subparsers)`; each sets `func=` on its parser. Keep heavy
# imports (torch, transformers, ray) inside the command functions so `gap3d --help` stays fast.
COMMAND_MODULES = (
    "gap3d.tiny_models",
    "gap3d.smoke",
    "gap3d.data.synth",
    "gap3d.trellis.commands",
    "gap3d.demo_command",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every registered command."""
    parser = argparse.ArgumentParser(prog="gap3d", description="GAP3D: text-to-3D through an aligned VLM prompt encoder.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `gap3d` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return args.func(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
