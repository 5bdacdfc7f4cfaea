"""What a rerun of the training job may change (ray_jobs/resume.py), decided on the driver from the checkpoint's
files."""

import json
import logging
import tempfile
from pathlib import Path

import pytest

from gap3d.config import save_config
from gap3d.training import LRContinuation, lr_multiplier
from ray_jobs.resume import ResumePlan, plan_resume
from ray_jobs.run_checkpoints import RunStorage
from tests.support import small_job, write_complete_checkpoint

STEP = 40
DATA = "features:0123456789abcdef"


def write_checkpoint(run, step, *overrides, lr_continuation=None, data=DATA):
    """A complete checkpoint with what the driver reads of it (config.yaml and progress.json)."""
    config, sections = small_job("train.max_steps=100", *overrides)
    with tempfile.TemporaryDirectory() as directory:
        save_config(config, Path(directory) / "config.yaml", {"scaling": sections["scaling"]})
        files = {"config.yaml": (Path(directory) / "config.yaml").read_bytes()}
    files["progress.json"] = json.dumps(
        {"step": step, "epoch": 0, "batches_in_epoch": step, "data": data, "lr_continuation": lr_continuation}
    ).encode()
    return write_complete_checkpoint(str(run), step, {0: files})


def plan(run, *overrides, data=DATA) -> ResumePlan:
    config, sections = small_job("train.max_steps=100", *overrides)
    return plan_resume(RunStorage.at(str(run)), config, sections["scaling"], data)


def test_a_run_without_checkpoints_starts_fresh(tmp_path):
    assert plan(tmp_path / "new-run") == ResumePlan(None, 0, None)


def test_the_newest_complete_checkpoint_is_resumed(tmp_path):
    write_checkpoint(tmp_path, 20)
    write_checkpoint(tmp_path, STEP)
    (tmp_path / "checkpoint_00000060").mkdir()  # an upload that never finished
    assert plan(tmp_path) == ResumePlan(str(tmp_path / f"checkpoint_{STEP:08d}"), STEP, None)


@pytest.mark.parametrize(
    "override",
    ["scaling.num_workers=4", "scaling.zero_stage=2", "train.global_batch_size=32", "train.seed=3", "aligner.depth=3"],
)
def test_a_change_that_moves_weights_or_data_position_fails_naming_the_key(tmp_path, override):
    write_checkpoint(tmp_path, STEP)
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=f"changed {key}: "):
        plan(tmp_path, override)


def test_other_training_data_fail_the_resume(tmp_path):
    write_checkpoint(tmp_path, STEP)
    with pytest.raises(ValueError, match="training data differ"):
        plan(tmp_path, data="features:fedcba9876543210")


def test_max_steps_below_the_checkpoint_step_fails_and_equal_says_the_run_is_complete(tmp_path, caplog):
    write_checkpoint(tmp_path, STEP)
    with pytest.raises(ValueError, match=f"train.max_steps=30 is below step {STEP}"):
        plan(tmp_path, "train.max_steps=30")
    with caplog.at_level(logging.INFO, logger="gap3d.train"):
        assert plan(tmp_path, f"train.max_steps={STEP}").step == STEP
    assert "nothing to train" in caplog.text


def test_a_longer_run_continues_the_lr_from_where_it_was_and_logs_the_change(tmp_path, caplog):
    write_checkpoint(tmp_path, STEP)
    saved = small_job("train.max_steps=100")[0].train
    with caplog.at_level(logging.INFO, logger="gap3d.train"):
        resumed = plan(tmp_path, "train.max_steps=300")
    assert resumed.lr_continuation == LRContinuation(STEP, lr_multiplier(STEP, saved))
    assert "train.max_steps: 100 -> 300" in caplog.text


def test_a_new_lr_rescales_the_lr_from_the_checkpoint_on(tmp_path):
    write_checkpoint(tmp_path, STEP)
    saved = small_job("train.max_steps=100")[0].train
    config = small_job("train.max_steps=100", f"train.lr={saved.lr / 2}")[0]
    continuation = plan(tmp_path, f"train.lr={saved.lr / 2}").lr_continuation
    assert config.train.lr * lr_multiplier(STEP, config.train, continuation) == pytest.approx(
        saved.lr * lr_multiplier(STEP, saved) / 2
    )


def test_an_earlier_continuation_is_carried_when_nothing_else_changes(tmp_path):
    earlier = {"start_step": 20, "start_multiplier": 0.5}
    write_checkpoint(tmp_path, STEP, lr_continuation=earlier)
    assert plan(tmp_path).lr_continuation == LRContinuation(**earlier)
    assert plan(tmp_path, "train.log_every=7", "train.checkpoint_every=20").lr_continuation == LRContinuation(**earlier)
