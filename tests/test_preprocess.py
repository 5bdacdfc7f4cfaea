"""Preprocessing job: raw shards on S3 (moto) or local disk -> Parquet feature shards + manifest, through Ray Data."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from gap3d import storage
from gap3d.build import build_encoders
from gap3d.config import load_config
from gap3d.data.images import resize_and_center_crop
from gap3d.data.shards import Sample, decode_record, iter_shard_records, list_shards
from gap3d.features.format import batch_from_rows
from gap3d.features.identity import check_compatible, expected_manifest
from gap3d.features.store import read_manifest
from miniature.shards import write_synth
from ray_jobs.pipeline import ENCODE_PRESETS, output_stems, stream_features
from ray_jobs.preprocess import run_preprocess

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_SAMPLES = 24
SHARD_SIZE = 8
FP16 = {"rtol": 2e-3, "atol": 2e-3}
ENCODE = ENCODE_PRESETS["tiny"]


def feature_table(output_uri: str) -> pa.Table:
    """All rows of the feature files under output_uri, sorted by key."""
    fs, root = storage.filesystem(output_uri)
    fs.invalidate_cache(root)
    names = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".parquet") and not Path(p).name.startswith("."))
    tables = []
    for path in names:
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle))
    return pa.concat_tables(tables).sort_by("key")


def file_versions(output_uri: str) -> dict[str, str]:
    """Name -> modification stamp (ETag on S3, mtime locally) of every file under output_uri."""
    fs, root = storage.filesystem(output_uri)
    fs.invalidate_cache(root)
    return {Path(info["name"]).name: str(info.get("ETag") or info.get("mtime")) for info in fs.ls(root, detail=True)}


def direct_encoding(config, input_uri: str) -> dict[str, dict]:
    """Reference without Ray: each valid sample decoded and encoded alone, by key."""
    prompt_encoder, dino = build_encoders(config)
    expected = {}
    for shard in list_shards(input_uri):
        for record in iter_shard_records(shard):
            sample = decode_record(record, min_side=config.data.min_image_side, image_size=config.dino.image_size)
            if not isinstance(sample, Sample):
                continue
            image = resize_and_center_crop(sample.image, config.dino.image_size)
            batch = prompt_encoder.tokenize([sample.caption])
            expected[sample.key] = {
                "caption": sample.caption,
                "input_ids": batch.input_ids[0][batch.attention_mask[0].bool()].tolist(),
                "dino": dino.encode(image[None])[0],
                "cache": prompt_encoder.encode_prompt_cache([sample.caption])[0],
                "latents": prompt_encoder([sample.caption])[0].detach(),
            }
    return expected


def encoded_png(size: int, color=(30, 160, 220)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]], cut_inside: bytes | None = None) -> None:
    """A tar of `members`; with `cut_inside`, the archive ends a few bytes into that payload."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    data = buffer.getvalue()
    path.write_bytes(data[: data.index(cut_inside) + 4] if cut_inside else data)


@pytest.fixture(scope="module")
def s3_features(s3_server, ray_cluster, tiny_config):
    """Synthetic shards on S3 preprocessed once: {"raw", "features", "summary"} URIs and the run's summary."""
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="gap3d-preprocess-shared")
    raw, features = "s3://gap3d-preprocess-shared/raw", "s3://gap3d-preprocess-shared/features"
    write_synth(raw, NUM_SAMPLES, seed=3, shard_size=SHARD_SIZE)
    summary = run_preprocess(tiny_config, ENCODE, raw, features)
    return {"raw": raw, "features": features, "summary": summary}


@pytest.fixture(scope="module")
def local_raw(tmp_path_factory) -> Path:
    """Synthetic shards on local disk."""
    raw = tmp_path_factory.mktemp("raw")
    write_synth(str(raw), 16, seed=5, shard_size=4)
    return raw


def test_s3_features_match_a_direct_encoding_of_the_same_images(s3_features, tiny_config):
    table = feature_table(s3_features["features"])
    manifest = read_manifest(s3_features["features"])
    expected = direct_encoding(tiny_config, s3_features["raw"])
    assert table.column("key").to_pylist() == sorted(expected)
    rows = table.to_pydict()
    batch = batch_from_rows(rows, manifest)
    torch.testing.assert_close(batch.dino, torch.stack([expected[k]["dino"] for k in rows["key"]]), **FP16)
    for key, caption, input_ids, cache in zip(rows["key"], rows["caption"], rows["input_ids"], batch.caches):
        assert caption == expected[key]["caption"]
        assert input_ids == expected[key]["input_ids"]
        assert cache.next_position == expected[key]["cache"].next_position
        torch.testing.assert_close(cache.key_values, expected[key]["cache"].key_values, **FP16)


def test_summary_and_manifest_count_every_row_per_shard(s3_features, tiny_config):
    summary, manifest = s3_features["summary"], read_manifest(s3_features["features"])
    assert summary["rows_in"] == summary["rows_written"] == NUM_SAMPLES
    assert summary["skipped"] == {}
    assert set(manifest.shards) == {s.stem for s in list_shards(s3_features["raw"])}
    assert sum(entry["rows"] for entry in manifest.shards.values()) == NUM_SAMPLES
    assert manifest.dino_shape == [69, 64] and manifest.cache_shape == [2, 2, 2, 16]
    check_compatible(manifest, tiny_config)


def test_rerun_writes_nothing_new(s3_features, tiny_config):
    before = file_versions(s3_features["features"])
    summary = run_preprocess(tiny_config, ENCODE, s3_features["raw"], s3_features["features"])
    assert (summary["shards_written"], summary["rows_written"]) == (0, 0)
    assert summary["shards_already_complete"] == summary["shards_in"]
    after = file_versions(s3_features["features"])
    assert {k: v for k, v in after.items() if k != "manifest.json"} == {
        k: v for k, v in before.items() if k != "manifest.json"
    }


def test_streaming_dataset_yields_the_rows_preprocessing_writes(s3_features, tiny_config):
    streamed = pa.Table.from_pylist(stream_features(tiny_config, ENCODE, s3_features["raw"]).take_all()).sort_by("key")
    written = feature_table(s3_features["features"])
    assert streamed.column("key").to_pylist() == written.column("key").to_pylist()
    for name in ("caption", "input_ids", "next_position"):
        assert streamed.column(name).to_pylist() == written.column(name).to_pylist(), name
    for name in ("dino", "prompt_cache"):
        np.testing.assert_array_equal(
            np.concatenate([np.asarray(v, dtype=np.float16) for v in streamed.column(name).to_pylist()]),
            np.concatenate([np.asarray(v, dtype=np.float16) for v in written.column(name).to_pylist()]),
        )


def test_expected_manifest_describes_the_streamed_rows_like_the_written_manifest(s3_features, tiny_config):
    written = read_manifest(s3_features["features"])
    streamed = expected_manifest(tiny_config)
    assert (streamed.encoders, streamed.dino_shape, streamed.cache_shape) == (
        written.encoders,
        written.dino_shape,
        written.cache_shape,
    )


def test_features_from_other_encoders_are_refused(s3_features, tiny_config):
    frozen = load_config("tiny", overrides=["vlm.trainable=false"])
    with pytest.raises(ValueError, match="other encoders"):
        run_preprocess(frozen, ENCODE, s3_features["raw"], s3_features["features"])


def test_frozen_soft_tokens_store_soft_latents(ray_cluster, tiny_config, tmp_path):
    frozen = load_config("tiny", overrides=["vlm.trainable=false"])
    raw = tmp_path / "raw"
    write_synth(str(raw), 6, seed=7, shard_size=6)
    run_preprocess(frozen, ENCODE, str(raw), str(tmp_path / "features"))
    rows = feature_table(str(tmp_path / "features")).to_pydict()
    assert "prompt_cache" not in rows
    expected = direct_encoding(frozen, str(raw))
    latents = batch_from_rows(rows, read_manifest(str(tmp_path / "features"))).latents
    torch.testing.assert_close(latents, torch.stack([expected[k]["latents"] for k in rows["key"]]), **FP16)


def test_bad_records_of_every_kind_are_skipped_and_counted_while_good_rows_survive(ray_cluster, tiny_config, tmp_path):
    good = encoded_png(96)
    members = [
        ("good0.png", good),
        ("good0.txt", b"a blue cube"),
        ("garbage.png", b"not an image at all"),
        ("garbage.txt", b"a caption"),
        ("nocaption.png", good),
        ("blank.png", good),
        ("blank.txt", b"   \n"),
        ("tiny.png", encoded_png(16)),
        ("tiny.txt", b"a small image"),
        ("noimage.txt", b"a caption without an image"),
        ("long.png", good),
        ("long.txt", " ".join(["a very long caption"] * 200).encode()),
        ("good1.png", good),
        ("good1.txt", b"a blue sphere"),
        ("cut.png", good),
        ("cut.txt", b"cut off by the end of the archive"),
    ]
    (tmp_path / "raw").mkdir()
    write_tar(tmp_path / "raw" / "bad.tar", members, cut_inside=b"cut off by the end")
    summary = run_preprocess(tiny_config, ENCODE, str(tmp_path / "raw"), str(tmp_path / "features"))
    assert summary["skipped"] == {
        "corrupt_member": 1,
        "empty_caption": 1,
        "image_too_small": 1,
        "missing_caption": 1,
        "missing_image": 1,
        "prompt_too_long": 1,
        "undecodable_image": 1,
    }
    assert (summary["rows_in"], summary["rows_written"]) == (9, 2)
    assert feature_table(str(tmp_path / "features")).column("key").to_pylist() == ["good0", "good1"]
    assert read_manifest(str(tmp_path / "features")).shards["bad"]["skipped"] == summary["skipped"]


def test_parquet_input_with_a_bad_row_is_encoded(ray_cluster, tiny_config, tmp_path):
    (tmp_path / "raw").mkdir()
    pq.write_table(
        pa.table(
            {
                "key": ["p0", "p1", "p2"],
                "image": [encoded_png(80), b"\x89PNG broken", encoded_png(70)],
                "caption": ["a red cone", "broken", "a green torus"],
            }
        ),
        tmp_path / "raw" / "part-0.parquet",
    )
    summary = run_preprocess(tiny_config, ENCODE, f"file://{tmp_path / 'raw'}", str(tmp_path / "features"))
    assert summary["skipped"] == {"undecodable_image": 1}
    rows = feature_table(str(tmp_path / "features")).to_pydict()
    assert rows["key"] == ["p0", "p2"] and rows["caption"] == ["a red cone", "a green torus"]


def test_two_inputs_that_would_write_the_same_feature_files_are_refused(tmp_path):
    for name in ("a.tar", "a.tgz"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"would both write a\.\*\.parquet"):
        output_stems(list_shards(str(tmp_path)))


def test_resumed_run_after_missing_and_partial_outputs_gives_exactly_the_full_output(
    ray_cluster, tiny_config, local_raw, tmp_path
):
    features = tmp_path / "features"
    run_preprocess(tiny_config, ENCODE, str(local_raw), str(features))
    full = feature_table(str(features))
    outputs = sorted(features.glob("*.parquet"))
    outputs[0].unlink()  # never written
    outputs[1].write_bytes(outputs[1].read_bytes()[:1000])  # a partial file under its final name
    stale = features / f".{outputs[2].name}.x.partial"
    stale.write_bytes(b"left by a killed writer")
    summary = run_preprocess(tiny_config, ENCODE, str(local_raw), str(features))
    assert summary["shards_written"] == 2
    assert not stale.exists()
    assert feature_table(str(features)).equals(full)
    assert sum(entry["rows"] for entry in read_manifest(str(features)).shards.values()) == full.num_rows


def test_more_input_later_encodes_only_the_new_shards(ray_cluster, tiny_config, local_raw, tmp_path):
    features = str(tmp_path / "features")
    first = run_preprocess(tiny_config, ENCODE, str(local_raw / "train-000000.tar"), features)
    second = run_preprocess(tiny_config, ENCODE, str(local_raw), features)
    assert first["shards_written"] == 1
    assert (second["shards_written"], second["shards_already_complete"]) == (len(list_shards(str(local_raw))) - 1, 1)
    assert feature_table(features).num_rows == 16


def job_command(config, input_uri: str, output_uri: str, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "ray_jobs/preprocess.py",
        "--input",
        input_uri,
        "--output",
        output_uri,
        "--preset",
        "tiny",
        *overrides,
    ]


def job_env(ray_cluster) -> dict:
    """Environment of a job process that joins the session's Ray cluster, as `ray job submit` would run it."""
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    # `ray job submit --working-dir .` puts the working directory on PYTHONPATH; so does this.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def test_job_run_as_a_script_prints_a_json_summary(ray_cluster, tiny_config, local_raw, tmp_path):
    command = job_command(tiny_config, str(local_raw), str(tmp_path / "features"))
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=job_env(ray_cluster), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rows_written"] == 16 and summary["skipped"] == {}
    assert {"rows_in", "wall_s", "rows_per_s"} <= set(summary)


def test_job_killed_mid_run_then_resumed_gives_every_row_once(ray_cluster, tiny_config, tmp_path):
    raw, features = tmp_path / "raw", tmp_path / "features"
    write_synth(str(raw), 16, seed=9, shard_size=2)
    # One sample per encoder call keeps the job busy long enough to be killed between shards.
    command = job_command(tiny_config, str(raw), str(features), "encode.encode_batch_size=1")
    job = subprocess.Popen(
        command, cwd=REPO_ROOT, env=job_env(ray_cluster), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 240
        while not list(features.glob("shards/*.json")) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    assert job.returncode == -signal.SIGKILL, "the job ended before it could be killed"
    summary = run_preprocess(tiny_config, ENCODE, str(raw), str(features))
    assert summary["shards_already_complete"] >= 1 and summary["shards_written"] >= 1
    keys = feature_table(str(features)).column("key").to_pylist()
    assert keys == [f"{i:08d}" for i in range(16)]
    assert sum(entry["rows"] for entry in read_manifest(str(features)).shards.values()) == 16
