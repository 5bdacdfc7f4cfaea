"""Keep cluster/kuberay/rayservice.yaml's serveConfigV2 equal to serve/config.gpu.yaml.

    python cluster/sync_rayservice.py           # rewrite the serveConfigV2 block from serve/config.gpu.yaml
    python cluster/sync_rayservice.py --check   # exit 1 if the manifest is out of sync (for CI)

The block holds the Serve config file's text verbatim, so `serve deploy serve/config.gpu.yaml` on a `ray up`
cluster and the RayService on KubeRay run the same deployments, autoscaling and builder args.
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVE_CONFIG = REPO / "serve" / "config.gpu.yaml"
RAYSERVICE = REPO / "cluster" / "kuberay" / "rayservice.yaml"
BLOCK_KEY = "  serveConfigV2: |\n"
BLOCK_INDENT = " " * 4


def render(manifest_text: str, serve_config_text: str) -> str:
    """`manifest_text` with the serveConfigV2 literal block replaced by `serve_config_text`, indented."""
    if BLOCK_KEY not in manifest_text:
        raise ValueError(f"{RAYSERVICE} has no line {BLOCK_KEY.strip()!r} at two-space indent under spec")
    before, after = manifest_text.split(BLOCK_KEY, 1)
    lines = after.splitlines(keepends=True)
    block_end = next(
        (i for i, line in enumerate(lines) if line.strip() and not line.startswith(BLOCK_INDENT)), len(lines)
    )
    block = "".join(
        BLOCK_INDENT + line if line.strip() else "\n" for line in serve_config_text.splitlines(keepends=True)
    )
    return before + BLOCK_KEY + block + "".join(lines[block_end:])


def main(argv: list[str] | None = None) -> int:
    """Rewrite or check rayservice.yaml; returns the exit status."""
    parser = argparse.ArgumentParser(description="Generate rayservice.yaml's serveConfigV2 from serve/config.gpu.yaml.")
    parser.add_argument("--check", action="store_true", help="fail instead of writing when the manifest is out of sync")
    args = parser.parse_args(argv)
    current = RAYSERVICE.read_text()
    wanted = render(current, SERVE_CONFIG.read_text())
    if current == wanted:
        return 0
    if args.check:
        sys.stderr.write(f"{RAYSERVICE} is out of sync with {SERVE_CONFIG}; run `python cluster/sync_rayservice.py`\n")
        return 1
    RAYSERVICE.write_text(wanted)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
