"""Storage: local paths and s3:// URIs served by a real S3 API on 127.0.0.1."""

import logging
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import s3fs

from gap3d.storage import (
    STAGING_DIR,
    is_remote,
    local_dir,
    remove_partial_files,
    remove_stale_staging,
    staging_dir,
    temp_file_for,
    upload_dir,
)


def test_remote_schemes_are_recognised():
    assert is_remote("s3://bucket/x") and is_remote("gs://bucket/x")
    assert not is_remote("/tmp/x") and not is_remote("file:///tmp/x") and not is_remote("relative/dir")


def test_local_directory_is_returned_as_is(tmp_path):
    assert local_dir(str(tmp_path)) == tmp_path
    assert local_dir(f"file://{tmp_path}") == tmp_path


def test_s3_directory_is_downloaded_once_into_the_cache(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("GAP3D_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a.json").write_text("{}")
    (source / "sub" / "b.bin").write_bytes(b"\x00\x01")
    upload_dir(source, f"{s3_bucket}/ckpt")
    first = local_dir(f"{s3_bucket}/ckpt")
    assert (first / "a.json").read_text() == "{}" and (first / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    (first / "a.json").write_text("cached")  # a second call must not download again
    assert (local_dir(f"{s3_bucket}/ckpt/") / "a.json").read_text() == "cached"


def test_missing_local_and_remote_directories_name_the_path(s3_bucket, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        local_dir(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=f"{s3_bucket}/nothing"):
        local_dir(f"{s3_bucket}/nothing")


def test_a_changed_remote_directory_is_downloaded_again(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("GAP3D_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "src"
    source.mkdir()
    (source / "weights.bin").write_bytes(b"old")
    upload_dir(source, f"{s3_bucket}/ckpt")
    assert (local_dir(f"{s3_bucket}/ckpt") / "weights.bin").read_bytes() == b"old"
    (source / "weights.bin").write_bytes(b"new weights")
    upload_dir(source, f"{s3_bucket}/ckpt")
    assert (local_dir(f"{s3_bucket}/ckpt") / "weights.bin").read_bytes() == b"new weights"


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _fetch_and_count_downloads(uri: str, start) -> int:
    """Subprocess body: wait for the others at `start`, local_dir(uri), then how many downloads this process logged."""
    original_get = s3fs.S3FileSystem.get

    def slow_get(self, *args, **kwargs):
        time.sleep(1.0)  # a real checkpoint takes minutes to download, so processes overlap as they would
        return original_get(self, *args, **kwargs)

    s3fs.S3FileSystem.get = slow_get
    messages = _Messages()
    logging.getLogger("gap3d.storage").addHandler(messages)
    logging.getLogger("gap3d.storage").setLevel(logging.INFO)
    start.wait(timeout=60)
    assert (local_dir(uri) / "weights.bin").read_bytes() == b"w" * 100_000
    return sum(message.startswith("downloading") for message in messages.messages)


def test_processes_sharing_the_cache_download_a_remote_directory_once(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("GAP3D_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "src"
    source.mkdir()
    (source / "weights.bin").write_bytes(b"w" * 100_000)
    upload_dir(source, f"{s3_bucket}/ckpt")
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(4) as pool:
        start = manager.Barrier(4)
        downloads = pool.starmap(_fetch_and_count_downloads, [(f"{s3_bucket}/ckpt", start)] * 4)
    assert sum(downloads) == 1, downloads
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if ".partial-" in p.name) == []


def test_files_bound_for_object_storage_are_staged_in_this_processes_own_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = temp_file_for("s3://bucket/features/a.00000.parquet")
    assert Path(path).parent == tmp_path / STAGING_DIR / str(os.getpid())


def test_a_staging_directory_lives_in_this_processes_staging_and_is_removed_on_exit(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with staging_dir("gap3d-ckpt-10-") as directory:
        (directory / "rng_rank0.pt").write_bytes(b"state")
        assert directory.parent == tmp_path / STAGING_DIR / str(os.getpid())
    assert not directory.exists()


def test_staging_of_writers_that_are_gone_is_removed_and_of_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead, alive = tmp_path / STAGING_DIR / finished.stdout.strip(), tmp_path / STAGING_DIR / str(os.getpid())
    for directory in (dead, alive):
        directory.mkdir(parents=True)
        (directory / ".a.00000.parquet.x.partial").write_bytes(b"left by a killed writer")
    assert remove_stale_staging() == 1
    assert not dead.exists() and alive.exists()


def test_unfinished_uploads_and_partial_objects_under_an_s3_directory_are_removed(s3_bucket):
    bucket = s3_bucket.removeprefix("s3://")
    fs = s3fs.S3FileSystem()
    client_args = {"Bucket": bucket}
    fs.call_s3("create_multipart_upload", Key="features/a.00000.parquet", **client_args)
    fs.call_s3("create_multipart_upload", Key="elsewhere/b.parquet", **client_args)
    fs.pipe(f"{bucket}/features/.a.00001.parquet.x.partial", b"left by an old writer")
    assert remove_partial_files(f"{s3_bucket}/features") == 2
    remaining = [upload["Key"] for upload in fs.call_s3("list_multipart_uploads", **client_args).get("Uploads", [])]
    assert remaining == ["elsewhere/b.parquet"]
    assert not fs.exists(f"{bucket}/features/.a.00001.parquet.x.partial")
