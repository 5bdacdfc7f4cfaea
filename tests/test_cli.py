"""The `gap3d` console script."""

import json
import subprocess


def test_gap3d_help_lists_the_commands():
    out = subprocess.run(["gap3d", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("smoke", "make-tiny", "data", "trellis", "demo"):
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


def test_demo_options_are_the_drivers_options():
    from gap3d.cli import build_parser
    from ray_jobs.demo import parse_args

    cli = build_parser().parse_args(["demo", "--workdir", "/tmp/x", "--num-samples", "64", "train.max_steps=5"])
    driver = parse_args(["--workdir", "/tmp/x", "--num-samples", "64", "train.max_steps=5"])
    assert (cli.workdir, cli.num_samples, cli.overrides) == (driver.workdir, driver.num_samples, driver.overrides)
