"""The `gap3d` console script."""

import json
import subprocess


def test_gap3d_help_lists_the_commands():
    out = subprocess.run(["gap3d", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("smoke", "make-tiny", "data"):
        assert command in out


def test_smoke_generates_aligned_tokens_for_the_tiny_preset(tiny_checkpoints):
    out = subprocess.run(
        ["gap3d", "smoke", "--prompt", "a red cone", "--preset", "tiny",
         f"vlm.path={tiny_checkpoints['vlm']}", f"dino.path={tiny_checkpoints['dino']}"],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["condition_shape"] == [1, 8, 64]
    assert summary["tokens_shape"] == [1, 261, 64]
    assert summary["tokens_finite"]


def test_bad_override_exits_nonzero_naming_the_key():
    result = subprocess.run(["gap3d", "smoke", "train.nope=1"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "train.nope" in result.stderr
