"""Which checkpoints of a run count (ray_jobs/run_checkpoints.py): completion records, fallback, set-aside,
retention."""

import logging
import os

import pytest
import s3fs

from ray_jobs.run_checkpoints import INVALID_DIR, INVALID_NOTE, RECORD_NAME, RunStorage, newest_valid_checkpoint
from tests.support import write_complete_checkpoint

OPTIMIZER = "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"


def write_steps(run_uri: str, *steps: int) -> None:
    """Complete checkpoints of two ranks, as training writes them."""
    for step in steps:
        write_complete_checkpoint(
            run_uri,
            step,
            {
                0: {"progress.json": b'{"step": %d}' % step, "deepspeed/mp_rank_00_model_states.pt": os.urandom(4096)},
                1: {OPTIMIZER: os.urandom(8192), "rng_rank1.pt": b"rng"},
            },
        )


def truncate(path, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)


def invalid_notes(run_dir) -> dict[str, str]:
    """Set-aside checkpoint directory name -> the reason written beside it."""
    return {path.parent.name: path.read_text() for path in (run_dir / INVALID_DIR).glob(f"*/{INVALID_NOTE}")}


def test_a_checkpoint_whose_files_match_its_record_counts(tmp_path):
    write_steps(str(tmp_path), 10)
    run = RunStorage.at(str(tmp_path))
    assert run.problem(10) is None and run.newest_valid(set_aside=True) == 10


def test_a_truncated_file_makes_the_rerun_fall_back_to_the_previous_checkpoint_and_name_the_file(tmp_path, caplog):
    write_steps(str(tmp_path), 10, 20)
    truncate(tmp_path / "checkpoint_00000020" / OPTIMIZER, 100)
    with caplog.at_level(logging.WARNING, logger="gap3d.train"):
        assert RunStorage.at(str(tmp_path)).newest_valid(set_aside=True) == 10
    bad = str(tmp_path / "checkpoint_00000020" / OPTIMIZER)
    assert f"{bad} has 100 bytes, its record 8192" in caplog.text


def test_a_checkpoint_that_does_not_count_is_moved_aside_with_its_reason(tmp_path):
    write_steps(str(tmp_path), 10, 20)
    (tmp_path / "checkpoint_00000020" / OPTIMIZER).unlink()
    RunStorage.at(str(tmp_path)).newest_valid(set_aside=True)
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*")) == ["checkpoint_00000010"]
    [(name, reason)] = invalid_notes(tmp_path).items()
    assert name.startswith("checkpoint_00000020-") and f"{OPTIMIZER} is missing" in reason
    assert (tmp_path / INVALID_DIR / name / "rng_rank1.pt").read_bytes() == b"rng"


def test_a_changed_file_of_the_same_size_is_caught_by_its_hash(tmp_path):
    write_steps(str(tmp_path), 10)
    (tmp_path / "checkpoint_00000010" / "rng_rank1.pt").write_bytes(b"RNG")
    assert RunStorage.at(str(tmp_path)).problem(10).endswith("rng_rank1.pt does not match the sha256 in its record")


def test_a_checkpoint_without_a_record_is_an_unfinished_save(tmp_path):
    write_steps(str(tmp_path), 10, 20)
    (tmp_path / "checkpoint_00000020" / RECORD_NAME).unlink()
    run = RunStorage.at(str(tmp_path))
    assert "has no complete.json: its save never finished" in run.problem(20)
    assert run.newest_valid(set_aside=True) == 10


def test_an_unreadable_record_does_not_count(tmp_path):
    write_steps(str(tmp_path), 10)
    truncate(tmp_path / "checkpoint_00000010" / RECORD_NAME, 20)
    assert f"{tmp_path / 'checkpoint_00000010' / RECORD_NAME} is unreadable" in RunStorage.at(str(tmp_path)).problem(10)


def test_a_step_written_again_does_not_count_until_its_new_record_is_written(tmp_path):
    write_steps(str(tmp_path), 10)
    run = RunStorage.at(str(tmp_path))
    run.discard_record(10)
    assert run.problem(10) is not None


def test_no_record_is_written_when_a_ranks_file_is_not_in_storage(tmp_path):
    run = RunStorage.at(str(tmp_path))
    files = {"rng_rank1.pt": {"size": 3, "sha256": "0" * 64}}  # uploaded to another node's disk, say
    with pytest.raises(
        RuntimeError, match="rng_rank1.pt, written by rank 1 on node b, is missing in storage as rank 0 sees it"
    ):
        run.write_record(10, [{"rank": 1, "node": "b", "files": files}])
    assert not (tmp_path / "checkpoint_00000010" / RECORD_NAME).exists()


def test_retention_keeps_the_newest_complete_checkpoints_and_drops_older_unfinished_ones(tmp_path):
    write_steps(str(tmp_path), 10, 20, 30, 40)
    (tmp_path / "checkpoint_00000030" / RECORD_NAME).unlink()
    RunStorage.at(str(tmp_path)).prune(40, keep=2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*")) == ["checkpoint_00000020", "checkpoint_00000040"]


def test_evaluating_a_run_takes_its_newest_valid_checkpoint_and_moves_nothing(tmp_path):
    write_steps(str(tmp_path), 10, 20)
    (tmp_path / "checkpoint_00000020" / RECORD_NAME).unlink()
    assert newest_valid_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint_00000010")
    assert (tmp_path / "checkpoint_00000020").is_dir() and not (tmp_path / INVALID_DIR).exists()


def test_on_s3_a_truncated_checkpoint_is_set_aside_and_the_previous_one_resumed(s3_bucket):
    run_uri = f"{s3_bucket}/runs/a"
    write_steps(run_uri, 10, 20)
    fs = s3fs.S3FileSystem()
    bad = f"{run_uri.removeprefix('s3://')}/checkpoint_00000020/{OPTIMIZER}"
    fs.pipe(bad, fs.cat_file(bad)[:100])
    assert RunStorage.at(run_uri).newest_valid(set_aside=True) == 10
    fs.invalidate_cache()
    assert not fs.exists(bad)
    [note] = fs.glob(f"{run_uri.removeprefix('s3://')}/{INVALID_DIR}/checkpoint_00000020-*/{INVALID_NOTE}")
    assert f"{run_uri}/checkpoint_00000020/{OPTIMIZER} has 100 bytes" in fs.cat_file(note).decode()
