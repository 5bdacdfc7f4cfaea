"""The project's command line: `python -m cli COMMAND [args]` runs COMMAND's `main(argv)`.

The Ray jobs are also scripts of their own (`python ray_jobs/<job>.py`, `ray job submit -- python ray_jobs/...`);
`python -m cli COMMAND --help` shows a command's options.
"""

import sys

from cli import broker, demo, make_evalset, make_tiny, mirror_checkpoints, smoke, synth
from ray_jobs import evaluate, evaluate_3d, preprocess, train, train_decoder

COMMANDS = {
    "demo": demo,
    "synth": synth,
    "preprocess": preprocess,
    "train": train,
    "train-decoder": train_decoder,
    "evaluate": evaluate,
    "evaluate-3d": evaluate_3d,
    "smoke": smoke,
    "make-tiny": make_tiny,
    "broker": broker,
    "mirror-checkpoints": mirror_checkpoints,
    "make-evalset": make_evalset,
}


def usage() -> str:
    """One line per command: its name and the first line of its module's docstring."""
    lines = [f"  {name:<14} {module.__doc__.strip().splitlines()[0]}" for name, module in COMMANDS.items()]
    return "usage: python -m cli COMMAND [args]\n\ncommands:\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        sys.stderr.write(f"unknown command {argv[0]!r}\n\n{usage()}")
        return 2
    return COMMANDS[argv[0]].main(argv[1:])
