"""Raw shard reading: listing, WebDataset/Parquet records, every skip reason, DINOv2 image prep."""

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gap3d import storage
from gap3d.data.shards import (
    SKIP_REASONS,
    Sample,
    Skipped,
    decode_record,
    iter_parquet_records,
    iter_shard_records,
    iter_tar_records,
    list_shards,
)
from miniature.img2dataset import Download, sample_key, write_img2dataset_shard


def encoded_image(size=(80, 80), color=(200, 30, 30), mode="RGB", fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def decode_all(records, min_side=64) -> list[Sample | Skipped]:
    return [decode_record(r, min_side=min_side) for r in records]


def reasons(results) -> Counter:
    return Counter(r.reason for r in results if isinstance(r, Skipped))


def good_keys(results) -> list[str]:
    return [r.key for r in results if isinstance(r, Sample)]


GOOD_PNG = encoded_image()


def test_skip_reasons_are_the_documented_set():
    assert set(SKIP_REASONS) == {
        "undecodable_image",
        "missing_caption",
        "empty_caption",
        "image_too_small",
        "missing_image",
        "corrupt_member",
        "duplicate_key",
        "unreadable_shard",
    }


def test_tar_records_pair_each_image_with_its_caption():
    data = tar_bytes(
        [
            ("a.jpg", encoded_image(fmt="JPEG")),
            ("a.txt", b"a red square"),
            ("dir/b.png", GOOD_PNG),
            ("dir/b.json", json.dumps({"caption": "from json", "other": 1}).encode()),
            ("c.webp", encoded_image(fmt="WEBP")),
            ("c.txt", b"  padded caption \n"),
            ("c.cls", b"3"),
        ]
    )
    results = decode_all(iter_tar_records(io.BytesIO(data)))
    assert [(r.key, r.caption, r.image.mode, r.image.size) for r in results] == [
        ("a", "a red square", "RGB", (80, 80)),
        ("dir/b", "from json", "RGB", (80, 80)),
        ("c", "padded caption", "RGB", (80, 80)),
    ]


def test_txt_caption_wins_over_json_caption():
    data = tar_bytes([("k.png", GOOD_PNG), ("k.json", b'{"caption": "json"}'), ("k.txt", b"txt")])
    (record,) = iter_tar_records(io.BytesIO(data))
    assert record.caption == "txt"


def test_blank_txt_caption_gives_way_to_the_json_caption():
    data = tar_bytes([("k.png", GOOD_PNG), ("k.txt", b"  \n"), ("k.json", b'{"caption": "from json"}')])
    (record,) = iter_tar_records(io.BytesIO(data))
    assert record.caption == "from json"


def test_members_of_a_sample_are_grouped_by_key_when_not_adjacent():
    data = tar_bytes([("a.png", GOOD_PNG), ("b.png", GOOD_PNG), ("b.txt", b"bee"), ("a.txt", b"ay")])
    assert [(r.key, r.caption) for r in iter_tar_records(io.BytesIO(data))] == [("b", "bee"), ("a", "ay")]


def test_a_second_image_under_an_emitted_key_is_a_duplicate():
    data = tar_bytes(
        [
            ("a.png", GOOD_PNG),
            ("a.txt", b"first"),
            ("b.png", GOOD_PNG),
            ("b.txt", b"bee"),
            ("a.png", GOOD_PNG),
            ("a.txt", b"again"),
        ]
    )
    records = list(iter_tar_records(io.BytesIO(data)))
    assert [(r.key, r.caption, r.skip_reason) for r in records] == [
        ("a", "first", None),
        ("b", "bee", None),
        ("a", None, "duplicate_key"),
    ]


def test_gzipped_tar_shards_are_listed_and_read(tmp_path):
    import gzip

    payload = tar_bytes([("k.png", GOOD_PNG), ("k.txt", b"zipped")])
    for name in ("a.tar.gz", "b.tgz"):
        (tmp_path / name).write_bytes(gzip.compress(payload))
    shards = list_shards(str(tmp_path))
    assert [(s.shard_id, s.stem, s.format) for s in shards] == [
        ("a.tar.gz", "a", "webdataset"),
        ("b.tgz", "b", "webdataset"),
    ]
    assert [decode_record(r).caption for s in shards for r in iter_shard_records(s)] == ["zipped", "zipped"]


def img2dataset_dir(root: Path) -> Path:
    write_img2dataset_shard(str(root), 0, [Download("a red cube", GOOD_PNG), Download("lost", None)])
    write_img2dataset_shard(str(root), 1, [Download("a blue cone", GOOD_PNG)])
    return root


def test_img2dataset_metadata_parquet_is_the_tars_sidecar_not_a_shard(tmp_path):
    img2dataset_dir(tmp_path)
    for uri in (str(tmp_path), str(tmp_path / "*.tar")):
        shards = list_shards(uri)
        assert [(s.shard_id, s.metadata_uri) for s in shards] == [
            ("00000.tar", str(tmp_path / "00000.parquet")),
            ("00001.tar", str(tmp_path / "00001.parquet")),
        ]


def test_metadata_caption_fills_in_a_sample_without_one(tmp_path):
    write_img2dataset_shard(str(tmp_path), 0, [Download("from metadata", GOOD_PNG)])
    key = sample_key(0, 0)
    (tmp_path / "00000.tar").write_bytes(tar_bytes([(f"{key}.png", GOOD_PNG)]))  # the tar lost its .txt and .json
    (shard,) = list_shards(str(tmp_path))
    assert [(r.key, r.caption) for r in iter_shard_records(shard)] == [(key, "from metadata")]


def test_listing_leaves_out_the_output_directory(tmp_path):
    img2dataset_dir(tmp_path)
    (tmp_path / "features").mkdir()
    pq.write_table(parquet_table([(GOOD_PNG, "x")], with_key=True), tmp_path / "features" / "00000.00000.parquet")
    assert [s.shard_id for s in list_shards(str(tmp_path), exclude=str(tmp_path / "features"))] == [
        "00000.tar",
        "00001.tar",
    ]


def test_listed_shards_carry_the_identity_that_changes_with_their_content(tmp_path):
    img2dataset_dir(tmp_path)
    before = list_shards(str(tmp_path))[1]
    write_img2dataset_shard(str(tmp_path), 1, [Download("a blue cone", GOOD_PNG), Download("a green ring", GOOD_PNG)])
    after = list_shards(str(tmp_path))[1]
    assert before.identity() != after.identity() and after.identity()["size"] == (tmp_path / "00001.tar").stat().st_size


def test_every_bad_record_kind_is_skipped_with_its_reason_and_good_records_survive():
    good = [(f"good{i}.png", GOOD_PNG) for i in range(3)]
    captions = [(f"good{i}.txt", b"fine") for i in range(3)]
    data = tar_bytes(
        [good[0], captions[0]]
        + [("notimage.png", b"this is not an image"), ("notimage.txt", b"caption")]
        + [("truncated.png", GOOD_PNG[: len(GOOD_PNG) // 2]), ("truncated.txt", b"caption")]
        + [("nocaption.png", GOOD_PNG)]
        + [good[1], captions[1]]
        + [("emptycaption.png", GOOD_PNG), ("emptycaption.txt", b"  \n ")]
        + [("badjson.png", GOOD_PNG), ("badjson.json", b"{not json")]
        + [("tiny.png", encoded_image(size=(8, 100))), ("tiny.txt", b"caption")]
        + [("noimage.txt", b"caption only")]
        + [good[2], captions[2]]
    )
    results = decode_all(iter_tar_records(io.BytesIO(data)))
    assert good_keys(results) == ["good0", "good1", "good2"]
    assert reasons(results) == Counter(
        undecodable_image=2, missing_caption=2, empty_caption=1, image_too_small=1, missing_image=1
    )
    assert {r.key: r.reason for r in results if isinstance(r, Skipped)}["tiny"] == "image_too_small"


def test_truncated_tar_yields_its_good_records_then_one_corrupt_member():
    members = []
    for i in range(4):
        members += [(f"{i:04d}.png", encoded_image(color=(10 * i, 0, 0))), (f"{i:04d}.txt", b"caption")]
    data = tar_bytes(members)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last_png = [m for m in tar.getmembers() if m.name == "0003.png"][0]
    cut = last_png.offset_data + last_png.size // 2  # in the middle of the last image's bytes
    results = decode_all(iter_tar_records(io.BytesIO(data[:cut])))
    assert good_keys(results) == ["0000", "0001", "0002"]
    assert [(r.key, r.reason) for r in results if isinstance(r, Skipped)] == [("0003", "corrupt_member")]


def test_tar_cut_inside_a_header_ends_with_corrupt_member():
    data = tar_bytes([("a.png", GOOD_PNG), ("a.txt", b"ok"), ("b.png", GOOD_PNG), ("b.txt", b"ok")])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        header = [m for m in tar.getmembers() if m.name == "b.txt"][0].offset
    results = decode_all(iter_tar_records(io.BytesIO(data[: header + 100])))
    assert good_keys(results) == ["a"]
    assert reasons(results) == Counter(corrupt_member=1)


def test_garbled_header_mid_tar_ends_with_corrupt_member():
    members = [(f"{k}.{ext}", GOOD_PNG if ext == "png" else b"ok") for k in "abc" for ext in ("png", "txt")]
    data = bytearray(tar_bytes(members))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        header = [m for m in tar.getmembers() if m.name == "c.png"][0].offset
    data[header : header + 512] = b"\xff" * 512
    results = decode_all(iter_tar_records(io.BytesIO(bytes(data))))
    # "b" may have had more members behind the broken header, so it counts as the corrupt sample.
    assert good_keys(results) == ["a"]
    assert [(r.key, r.reason) for r in results if isinstance(r, Skipped)] == [("b", "corrupt_member")]


def test_bytes_that_are_not_a_tar_give_one_corrupt_member():
    results = decode_all(iter_tar_records(io.BytesIO(b"\x01garbage" * 200)))
    assert reasons(results) == Counter(corrupt_member=1) and not good_keys(results)


def parquet_table(rows: list[tuple], with_key: bool) -> pa.Table:
    columns = {
        "image": pa.array([r[0] for r in rows], pa.binary()),
        "caption": pa.array([r[1] for r in rows], pa.string()),
    }
    if with_key:
        columns["key"] = pa.array([f"id{i}" for i in range(len(rows))])
    return pa.table(columns)


def test_parquet_records_are_read_with_keys_and_skips(tmp_path):
    rows = [(GOOD_PNG, "one"), (b"junk", "two"), (GOOD_PNG, None), (None, "four"), (GOOD_PNG, "")]
    path = tmp_path / "part.parquet"
    pq.write_table(parquet_table(rows, with_key=True), path, row_group_size=2)
    results = decode_all(iter_parquet_records(str(path)))
    assert [r.key for r in results] == ["id0", "id1", "id2", "id3", "id4"]
    assert good_keys(results) == ["id0"] and results[0].caption == "one"
    assert reasons(results) == Counter(undecodable_image=1, missing_caption=1, missing_image=1, empty_caption=1)


def test_parquet_without_key_column_numbers_rows(tmp_path):
    path = tmp_path / "part.parquet"
    pq.write_table(parquet_table([(GOOD_PNG, "a"), (GOOD_PNG, "b")], with_key=False), path)
    assert [r.key for r in iter_parquet_records(str(path))] == ["00000000", "00000001"]


def test_parquet_image_struct_as_written_by_hf_datasets_is_read(tmp_path):
    image = pa.array([{"bytes": GOOD_PNG, "path": "x.png"}], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    path = tmp_path / "hf.parquet"
    pq.write_table(pa.table({"image": image, "caption": ["hf"]}), path)
    (result,) = decode_all(iter_parquet_records(str(path)))
    assert isinstance(result, Sample) and result.caption == "hf"


def test_truncated_parquet_gives_one_corrupt_member(tmp_path):
    path = tmp_path / "part.parquet"
    pq.write_table(parquet_table([(GOOD_PNG, "a")] * 4, with_key=False), path)
    path.write_bytes(path.read_bytes()[:-40])
    assert reasons(decode_all(iter_parquet_records(str(path)))) == Counter(corrupt_member=1)


def test_parquet_base64_images_are_decoded(tmp_path):
    import base64

    path = tmp_path / "part.parquet"
    text = base64.b64encode(GOOD_PNG).decode()
    pq.write_table(
        pa.table({"image": [text, f"data:image/png;base64,{text}", "not base64 !"], "caption": ["a", "b", "c"]}), path
    )
    results = decode_all(iter_parquet_records(str(path)))
    assert [getattr(r, "reason", "ok") for r in results] == ["ok", "ok", "undecodable_image"]


def test_parquet_rows_with_a_repeated_key_are_duplicates(tmp_path):
    path = tmp_path / "part.parquet"
    pq.write_table(pa.table({"key": ["a", "b", "a"], "image": [GOOD_PNG] * 3, "caption": ["x", "y", "z"]}), path)
    assert [(r.key, r.skip_reason) for r in iter_parquet_records(str(path))] == [
        ("a", None),
        ("b", None),
        ("a", "duplicate_key"),
    ]


def test_parquet_without_caption_column_raises_naming_the_columns(tmp_path):
    path = tmp_path / "part.parquet"
    pq.write_table(pa.table({"image": [GOOD_PNG], "text": ["x"]}), path)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['caption'\]"):
        list(iter_parquet_records(str(path)))


def make_shard_tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    one = tar_bytes([("k.png", GOOD_PNG), ("k.txt", b"tar caption")])
    (root / "b.tar").write_bytes(one)
    (root / "sub" / "c.tar").write_bytes(one)
    pq.write_table(parquet_table([(GOOD_PNG, "parquet caption")], with_key=False), root / "a.parquet")
    (root / ".b.tar.partial").write_bytes(one[:100])
    (root / "_SUCCESS").write_bytes(b"")
    (root / "notes.txt").write_bytes(b"not a shard")


def test_list_shards_is_sorted_skips_hidden_files_and_gives_relative_ids(tmp_path):
    make_shard_tree(tmp_path)
    shards = list_shards(str(tmp_path))
    assert [(s.shard_id, s.format) for s in shards] == [
        ("a.parquet", "parquet"),
        ("b.tar", "webdataset"),
        ("sub__c.tar", "webdataset"),
    ]
    assert shards[1].uri == str(tmp_path / "b.tar")


def test_shard_ids_do_not_depend_on_how_the_root_is_spelled(tmp_path):
    make_shard_tree(tmp_path)
    ids = [s.shard_id for s in list_shards(str(tmp_path))]
    assert [s.shard_id for s in list_shards(f"file://{tmp_path}/")] == ids


def test_list_shards_accepts_a_glob_and_a_single_file(tmp_path):
    make_shard_tree(tmp_path)
    assert [s.shard_id for s in list_shards(str(tmp_path / "*.tar"))] == ["b.tar"]
    assert [s.shard_id for s in list_shards(str(tmp_path / "sub" / "c.tar"))] == ["c.tar"]


def test_list_shards_of_a_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards at"):
        list_shards(str(tmp_path / "nothing"))


def test_shards_on_s3_are_listed_and_read(s3_bucket, tmp_path):
    make_shard_tree(tmp_path)
    storage.upload_dir(tmp_path, storage.join(s3_bucket, "raw"))
    shards = list_shards(storage.join(s3_bucket, "raw"))
    assert [s.shard_id for s in shards] == ["a.parquet", "b.tar", "sub__c.tar"]
    assert shards[0].uri == f"{s3_bucket}/raw/a.parquet"
    captions = [decode_record(r).caption for s in shards for r in iter_shard_records(s)]
    assert captions == ["parquet caption", "tar caption", "tar caption"]
