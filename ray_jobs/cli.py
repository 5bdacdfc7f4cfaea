"""The project's command line: `python -m ray_jobs COMMAND [args]` runs COMMAND's `main(argv)`.

Each command is also its own script (`python ray_jobs/<command>.py`, `ray job submit -- python ray_jobs/...`);
`python -m ray_jobs COMMAND --help` shows its options.
"""

import sys

from ray_jobs import broker, demo, evaluate, make_tiny, preprocess, smoke, synth, train, train_decoder

COMMANDS = {
    "demo": demo,
    "synth": synth,
    "preprocess": preprocess,
    "train": train,
    "train-decoder": train_decoder,
    "evaluate": evaluate,
    "smoke": smoke,
    "make-tiny": make_tiny,
    "broker": broker,
}


def usage() -> str:
    """One line per command: its name and the first line of its module's docstring."""
    lines = [f"  {name:<14} {module.__doc__.strip().splitlines()[0]}" for name, module in COMMANDS.items()]
    return "usage: python -m ray_jobs COMMAND [args]\n\ncommands:\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        sys.stderr.write(f"unknown command {argv[0]!r}\n\n{usage()}")
        return 2
    return COMMANDS[argv[0]].main(argv[1:])
