"""`python -m cli COMMAND`: one command line over every job's and tool's main(), run as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

from cli import commands

REPO = Path(__file__).resolve().parents[1]


def run(*args, timeout=600, cwd=REPO):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_help_lists_every_command():
    result = run("-m", "cli", "--help", timeout=600)
    assert result.returncode == 0
    for command in (
        "demo",
        "synth",
        "preprocess",
        "train",
        "train-decoder",
        "evaluate",
        "smoke",
        "make-tiny",
        "broker",
        "mirror-checkpoints",
        "make-evalset",
        "evaluate-3d",
    ):
        assert f"  {command} " in result.stdout


def test_each_command_is_its_modules_main():
    from cli import demo
    from ray_jobs import evaluate, preprocess, train

    assert {commands.COMMANDS[name].main for name in ("demo", "preprocess", "train", "evaluate")} == {
        demo.main,
        preprocess.main,
        train.main,
        evaluate.main,
    }


def test_unknown_command_exits_2_naming_it():
    assert commands.main(["nope"]) == 2


def test_smoke_generates_aligned_tokens_for_the_tiny_preset():
    result = run("-m", "cli", "smoke", "--prompt", "a red cone")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["condition_shape"] == [1, 8, 64]
    assert summary["tokens_shape"] == [1, 5 + 8 * 8, 64]  # CLS + 4 registers + the 8 x 8 patches of 112 px
    assert summary["tokens_finite"]


def test_a_job_runs_as_a_script_from_the_checkout():
    result = run("ray_jobs/train.py", "--help", timeout=600)
    assert result.returncode == 0, result.stderr
    assert "--features" in result.stdout


def test_bad_override_exits_nonzero_naming_the_key():
    result = run("-m", "cli", "smoke", "train.nope=1", timeout=600)
    assert result.returncode != 0
    assert "train.nope" in result.stderr
