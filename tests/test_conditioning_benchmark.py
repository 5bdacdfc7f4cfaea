"""benchmarks/conditioning.py, run as users run it: one JSON line per variant, and nothing left behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_the_random_vlm_variant_prints_its_per_class_figures_and_leaves_no_temporary_files(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}  # where tempfile puts the random VLM it writes
    command = [sys.executable, "benchmarks/conditioning.py", "--num", "60", "--steps", "2", "--variants", "random_vlm"]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    variants = [line for line in lines if line["figure"] == "conditioning_variant"]
    assert [line["variant"] for line in variants] == ["random_vlm"]
    shapes = variants[0]["shape_per_class"]
    assert shapes and set(shapes) <= {"cone", "cube", "pillar", "slab", "sphere", "torus"}
    assert all(0.0 <= accuracy <= 1.0 for accuracy in shapes.values())
    left = [path.name for path in scratch.iterdir() if not path.name.startswith("torchinductor_")]  # torch's cache
    assert left == []
