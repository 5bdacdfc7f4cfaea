"""Preprocessing inputs as they come: img2dataset's layout, .tar.gz, stray files, duplicates, chunking, changed inputs.

One job runs over a mixed input directory (module fixture); each test checks one behaviour of its result.
"""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from gap3d.data.shards import Shard
from gap3d.features.store import feature_files, read_manifest
from miniature.img2dataset import Download, sample_key, write_img2dataset_shard
from ray_jobs.pipeline import ENCODE_PRESETS, KeyRegistry, _shard_from_row, _shard_row
from ray_jobs.preprocess import run_preprocess

ENCODE = ENCODE_PRESETS["tiny"]


def jpeg(seed: int, size=(160, 120)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(120, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> None:
    with tarfile.open(path, mode) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def keys_written(features: Path) -> list[str]:
    return sorted(
        key
        for path in feature_files(str(features))
        for key in pq.read_table(path, columns=["key"]).column("key").to_pylist()
    )


@pytest.fixture(scope="module")
def mixed(ray_cluster, tiny_config, tmp_path_factory) -> dict:
    """img2dataset output (2 shards, one failed download), a .tar.gz with duplicate keys, a metadata-only Parquet,
    and the output directory inside the input; preprocessed once with 3-record chunks."""
    raw = tmp_path_factory.mktemp("mixed")
    downloads = [
        [Download(f"a red cube number {i}", jpeg(i)) for i in range(5)],
        [Download("a blue cone", jpeg(10)), Download("lost", None)],
    ]
    for index, shard in enumerate(downloads):
        write_img2dataset_shard(str(raw), index, shard)
    # A duplicate of an img2dataset key from another shard, a key repeated inside this one, and a member out of place.
    write_tar(
        raw / "extra.tar.gz",
        [
            (f"{sample_key(0, 1)}.jpg", jpeg(1)),
            (f"{sample_key(0, 1)}.txt", b"a copy"),
            ("x1.jpg", jpeg(21)),
            ("x2.jpg", jpeg(22)),
            ("x2.txt", b"a green torus"),
            ("x1.txt", b"a yellow ring"),
            ("x2.jpg", jpeg(23)),
            ("x2.txt", b"the same key again"),
        ],
        mode="w:gz",
    )
    pq.write_table(pa.table({"url": ["https://a"], "caption": ["no image column"]}), raw / "links.parquet")
    features = raw / "features"
    encode = ENCODE.__class__(**{**ENCODE.__dict__, "chunk_size": 3})
    summary = run_preprocess(tiny_config, encode, str(raw), str(features))
    return {"raw": raw, "features": features, "summary": summary, "encode": encode}


def test_img2dataset_directory_reads_tars_and_takes_their_parquet_as_metadata(mixed):
    assert mixed["summary"]["shards_in"] == 4  # 00000.tar, 00001.tar, extra.tar.gz, links.parquet
    assert set(read_manifest(str(mixed["features"])).shards) == {"00000", "00001", "extra", "links"}
    assert {sample_key(0, i) for i in range(5)} | {sample_key(1, 0)} <= set(keys_written(mixed["features"]))


def test_gzipped_tar_shard_is_read(mixed):
    assert {"x1", "x2"} <= set(keys_written(mixed["features"]))


def test_parquet_without_image_column_is_skipped_with_its_path_and_the_job_goes_on(mixed):
    unreadable = mixed["summary"]["shards_unreadable"]
    assert [entry["input"] for entry in unreadable] == [str(mixed["raw"] / "links.parquet")]
    assert (
        "lacks column(s) ['image']" in unreadable[0]["error"]
        and str(mixed["raw"] / "links.parquet") in unreadable[0]["error"]
    )
    assert mixed["summary"]["skipped"]["unreadable_shard"] == 1


def test_duplicate_keys_within_and_across_shards_are_kept_once_and_counted(mixed):
    keys = keys_written(mixed["features"])
    assert len(keys) == len(set(keys)) == 8  # 5 + 1 img2dataset samples, x1, x2
    assert mixed["summary"]["skipped"]["duplicate_key"] == 2


def test_members_of_one_sample_are_grouped_even_when_not_adjacent(mixed):
    rows = {}
    for path in feature_files(str(mixed["features"])):
        table = pq.read_table(path, columns=["key", "caption"]).to_pydict()
        rows.update(zip(table["key"], table["caption"]))
    assert (rows["x1"], rows["x2"]) == ("a yellow ring", "a green torus")


def test_shards_are_written_as_chunk_files_that_the_manifest_lists(mixed):
    manifest = read_manifest(str(mixed["features"]))
    assert sorted(manifest.shards["00000"]["files"]) == [
        "00000.00000.parquet",
        "00000.00001.parquet",
    ]  # 5 records, chunks of 3
    assert (
        sum(pq.read_metadata(p).num_rows for p in feature_files(str(mixed["features"]))) == manifest.totals["rows"] == 8
    )


def test_output_inside_the_input_is_not_read_back_as_input(mixed, tiny_config):
    summary = run_preprocess(tiny_config, mixed["encode"], str(mixed["raw"]), str(mixed["features"]))
    assert (summary["shards_in"], summary["shards_written"], summary["rows_written"]) == (4, 0, 0)


def test_changed_input_shard_is_encoded_again_and_totals_count_every_run(ray_cluster, tiny_config, tmp_path):
    raw, features = tmp_path / "raw", tmp_path / "features"
    write_img2dataset_shard(str(raw), 0, [Download(f"a red cube {i}", jpeg(i)) for i in range(3)])
    write_img2dataset_shard(str(raw), 1, [Download("a blue cone", jpeg(7))])
    first = run_preprocess(tiny_config, ENCODE, str(raw), str(features))
    write_img2dataset_shard(str(raw), 1, [Download("a blue cone", jpeg(7)), Download("a tall green cylinder", jpeg(8))])
    second = run_preprocess(tiny_config, ENCODE, str(raw), str(features))
    assert (first["rows_written"], second["shards_changed"], second["shards_written"], second["rows_written"]) == (
        4,
        1,
        1,
        2,
    )
    assert keys_written(features) == [
        sample_key(0, 0),
        sample_key(0, 1),
        sample_key(0, 2),
        sample_key(1, 0),
        sample_key(1, 1),
    ]
    assert second["totals_all_runs"]["rows"] == read_manifest(str(features)).totals["rows"] == 5


def test_feature_files_of_an_unfinished_shard_are_not_read(mixed, tmp_path):
    features = tmp_path / "features"
    shutil.copytree(mixed["features"], features)
    (features / "shards" / "00000.json").unlink()  # as if the job died before recording the shard complete
    manifest = json.loads((features / "manifest.json").read_text())
    del manifest["shards"]["00000"]
    (features / "manifest.json").write_text(json.dumps(manifest))
    assert not any("/00000." in path for path in feature_files(str(features)))


def test_key_registry_keeps_the_first_claimant_and_lets_a_retried_shard_keep_its_own_keys(ray_cluster):
    registry = KeyRegistry.remote({"done": ["a"]})
    assert ray.get(registry.claim.remote("s1", ["a", "b", "c"])) == [False, True, True]
    assert ray.get(registry.claim.remote("s2", ["b", "d"])) == [False, True]
    assert ray.get(registry.claim.remote("s1", ["b", "c"])) == [True, True]  # the same shard again, as a retried task


def test_a_shard_without_metadata_or_version_reaches_the_decode_task_as_it_was_listed(ray_cluster):
    # Ray Data turns a None field into a float NaN in numpy batches; it must not become a metadata path "nan".
    shards = [
        Shard(uri="/data/00000.tar", shard_id="00000.tar", format="webdataset", size=10),
        Shard("/data/00001.tar", "00001.tar", "webdataset", 20, "v1", "/data/00001.parquet"),
    ]
    rows = ray.data.from_items([_shard_row(i, shard) for i, shard in enumerate(shards)], override_num_blocks=2)
    seen = [
        _shard_from_row(batch, 0) for batch in rows.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0)
    ]
    assert sorted(seen, key=lambda shard: shard.uri) == shards
