"""Synthetic dataset: deterministic shards, held-out combinations, captions that match the pixels."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gap3d import storage
from gap3d.data.shards import decode_record, iter_shard_records, list_shards
from gap3d.evaluation import caption_labels
from miniature import world
from miniature.render import DEFAULT_CAMERA, project, rasterize
from miniature.shards import write_synth

NUM, SHARD_SIZE, IMAGE_SIZE = 150, 32, 96


def read_tar_samples(path_or_fileobj) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} of a tar, read with the standard library only."""
    samples: dict[str, dict[str, bytes]] = {}
    kwargs = {"fileobj": path_or_fileobj} if hasattr(path_or_fileobj, "read") else {"name": path_or_fileobj}
    with tarfile.open(mode="r", **kwargs) as tar:
        for member in tar:
            key, extension = member.name.split(".", 1)
            samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def read_split(out: Path, split: str) -> dict[str, dict[str, bytes]]:
    samples = {}
    for shard in sorted(out.glob(f"{split}-*.tar")):
        samples.update(read_tar_samples(shard))
    return samples


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synth(str(out), NUM, seed=7, shard_size=SHARD_SIZE, image_size=IMAGE_SIZE)
    return out


@pytest.fixture(scope="module")
def samples(synth_dir) -> dict[str, list[tuple[dict, np.ndarray]]]:
    """Per split: (attributes, RGB image) of every sample."""
    decoded = {}
    for split in world.SPLITS:
        decoded[split] = [
            (json.loads(files["json"]), np.asarray(Image.open(io.BytesIO(files["png"]))))
            for files in read_split(synth_dir, split).values()
        ]
    return decoded


def test_same_arguments_give_identical_bytes(synth_dir, tmp_path):
    write_synth(str(tmp_path), NUM, seed=7, shard_size=SHARD_SIZE, image_size=IMAGE_SIZE)
    first = {p.name: p.read_bytes() for p in synth_dir.iterdir()}
    second = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)


def test_worker_processes_write_the_same_bytes_as_one(tmp_path):
    write_synth(str(tmp_path / "one"), 40, seed=5, shard_size=16, image_size=48)
    write_synth(str(tmp_path / "two"), 40, seed=5, shard_size=16, image_size=48, workers=2)
    one = {p.name: p.read_bytes() for p in (tmp_path / "one").iterdir()}
    two = {p.name: p.read_bytes() for p in (tmp_path / "two").iterdir()}
    assert one.keys() == two.keys() and {"train-000001.tar", "eval-000000.tar", "synth.json"} <= one.keys()
    assert all(one[name] == two[name] for name in one)


def test_workers_below_one_are_refused(tmp_path):
    with pytest.raises(ValueError, match="workers=0"):
        write_synth(str(tmp_path), 4, workers=0)


def test_different_seeds_give_different_samples(tmp_path):
    write_synth(str(tmp_path / "a"), 8, seed=1, image_size=32)
    write_synth(str(tmp_path / "b"), 8, seed=2, image_size=32)
    assert read_split(tmp_path / "a", "train") != read_split(tmp_path / "b", "train")


def test_shards_hold_shard_size_samples_with_sequential_names(synth_dir):
    summary = json.loads((synth_dir / "synth.json").read_text())
    assert summary["counts"]["train"] + summary["counts"]["eval"] == NUM
    for split in world.SPLITS:
        names = sorted(p.name for p in synth_dir.glob(f"{split}-*.tar"))
        assert names == [f"{split}-{i:06d}.tar" for i in range(len(names))] == summary["shards"][split]
        sizes = [len(read_tar_samples(synth_dir / name)) for name in names]
        assert all(size == SHARD_SIZE for size in sizes[:-1]) and 0 < sizes[-1] <= SHARD_SIZE
        assert sum(sizes) == summary["counts"][split]


def test_every_sample_has_png_caption_attributes_and_occupancy(synth_dir):
    for split in world.SPLITS:
        for files in read_split(synth_dir, split).values():
            assert set(files) == {"png", "txt", "json", "occupancy.npy"}
            assert files["txt"].decode() == json.loads(files["json"])["caption"]
            image = Image.open(io.BytesIO(files["png"]))
            assert image.mode == "RGB" and image.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_no_partial_files_are_left_behind(synth_dir):
    assert sorted(p.name for p in synth_dir.iterdir() if not p.name.endswith(".tar")) == ["synth.json"]


def test_smaller_rerun_into_the_same_directory_warns_about_leftover_shards(tmp_path, caplog):
    write_synth(str(tmp_path), 10, seed=0, shard_size=2, image_size=32)
    caplog.clear()
    write_synth(str(tmp_path), 2, seed=0, shard_size=2, image_size=32)
    assert any("did not write" in record.getMessage() for record in caplog.records)


def test_held_out_pairs_never_appear_in_train(samples):
    assert samples["train"]
    assert not any((a["shape"], a["color"]) in world.HELD_OUT for a, _ in samples["train"])


def test_eval_holds_only_held_out_pairs(samples):
    assert samples["eval"]
    assert all((a["shape"], a["color"]) in world.HELD_OUT for a, _ in samples["eval"])


def test_every_shape_and_colour_word_occurs_in_train(samples):
    assert {a["shape"] for a, _ in samples["train"]} == set(world.SHAPES)
    assert {a["color"] for a, _ in samples["train"]} == set(world.COLORS)


def test_caption_names_the_shape_and_the_colour_and_nothing_else(samples):
    for attributes, _ in samples["train"] + samples["eval"]:
        caption = attributes["caption"]
        assert caption_labels([caption], world.ATTRIBUTES) == {
            "shape": [attributes["shape"]],
            "color": [attributes["color"]],
        }
        assert not any(word in caption for word in ("left", "right", "small", "large"))


def test_caption_labels_need_exactly_one_value_of_each_attribute_in_every_caption():
    assert caption_labels(["The cube is RED.", "one blue torus"], world.ATTRIBUTES) == {
        "shape": ["cube", "torus"],
        "color": ["red", "blue"],
    }
    assert caption_labels(["a red cube and a blue cube"], world.ATTRIBUTES) is None
    assert caption_labels(["a red cube", "a photo of a dog"], world.ATTRIBUTES) is None


def test_object_is_centred_and_fills_the_frame_as_trellis_crops_it(samples):
    for attributes, image in samples["train"] + samples["eval"]:
        rows, columns = np.nonzero(image.max(axis=2) > 16)  # visible pixels, not the resampling's faint halo
        extent = max(rows.max() + 1 - rows.min(), columns.max() + 1 - columns.min())
        assert abs(extent / IMAGE_SIZE - 1 / world.CROP_MARGIN) < 0.06, attributes  # 1.2x the object's box
        centre = np.array([(rows.min() + rows.max() + 1) / 2, (columns.min() + columns.max() + 1) / 2]) / IMAGE_SIZE
        assert np.abs(centre - 0.5).max() < 0.03, attributes
        assert image[0].max() == image[-1].max() == image[:, 0].max() == image[:, -1].max() == 0  # black border


def test_object_colour_is_nearest_to_the_caption_colour(samples):
    names = list(world.COLORS)
    palette = np.array([world.COLORS[n] for n in names])
    palette /= np.linalg.norm(palette, axis=1, keepdims=True)
    for attributes, image in samples["train"] + samples["eval"]:
        pixels = image[image.max(axis=2) > 0].astype(np.float64)
        mean = pixels.mean(axis=0) / np.linalg.norm(pixels.mean(axis=0))
        assert names[int(np.argmax(palette @ mean))] == attributes["color"], attributes


def test_object_mesh_lies_in_the_unit_cube_with_its_longest_side_one():
    for index in range(12):
        vertices, faces = world.object_mesh(world.sample_scene(3, index))
        low, high = vertices.min(axis=0), vertices.max(axis=0)
        np.testing.assert_allclose((low + high) / 2, 0.0, atol=1e-9)
        assert (high - low).max() == pytest.approx(1.0) and faces.max() < len(vertices)


def test_shapes_differ_in_silhouette_more_than_one_shape_under_its_turns():
    """What the caption does not say (yaw, elevation, light) changes the image far less than the shape does."""

    def mask(scene):
        return world.render_scene(scene, 48).max(axis=2) > 0

    def scene(shape, yaw):
        return world.Scene(shape, "white", yaw, 20.0, -20.0, f"a white {shape}")

    for shape in ("cone", "torus", "cube"):
        within = np.mean([(mask(scene(shape, 0.0)) != mask(scene(shape, yaw))).mean() for yaw in (-40.0, 40.0)])
        between = np.mean(
            [(mask(scene(shape, 0.0)) != mask(scene(other, 0.0))).mean() for other in world.SHAPES if other != shape]
        )
        assert within < between, shape


def test_rasterize_keeps_the_nearest_of_overlapping_triangles():
    size = 16
    screen = np.array([[0, 0], [16, 0], [0, 16], [0, 0], [16, 0], [0, 16]], dtype=np.float64)
    depth = np.array([3.0, 3.0, 3.0, 1.0, 1.0, 1.0])
    for faces in (np.array([[0, 1, 2], [3, 4, 5]]), np.array([[3, 4, 5], [0, 1, 2]])):
        pixel, face = rasterize(screen, depth, faces, size)
        near = int(np.nonzero(faces[:, 0] == 3)[0][0])
        # pixel centres (x + 0.5, y + 0.5) with x + y <= 15 lie in (or on the edge of) both triangles
        assert len(pixel) == len(np.unique(pixel)) == size * (size + 1) // 2
        assert np.all(face == near)


def test_project_puts_the_look_at_point_at_the_image_centre():
    screen, depth = project(np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), 100, DEFAULT_CAMERA)
    np.testing.assert_allclose(screen[0], [50.0, 50.0])
    assert screen[1, 0] > 50.0 and depth[0] == pytest.approx(DEFAULT_CAMERA.distance)


def test_writes_to_s3_and_reads_back_with_the_shard_reader(s3_bucket, tmp_path):
    uri = storage.join(s3_bucket, "synth")
    write_synth(uri, 12, seed=3, shard_size=5, image_size=48)
    write_synth(str(tmp_path), 12, seed=3, shard_size=5, image_size=48)
    fs, root = storage.filesystem(uri)
    for local in tmp_path.glob("*.tar"):
        assert fs.cat_file(storage.join(root, local.name)) == local.read_bytes()
    shards = list_shards(uri)
    assert [s.shard_id for s in shards] == sorted(p.name for p in tmp_path.glob("*.tar"))
    decoded = [decode_record(r, min_side=48) for s in shards for r in iter_shard_records(s)]
    assert len(decoded) == 12 and all(d.image.size == (48, 48) for d in decoded)


def test_synth_command_writes_shards(tmp_path):
    from cli.synth import main

    assert main(["--out", str(tmp_path), "--num", "5", "--seed", "4", "--image-size", "32"]) == 0
    summary = json.loads((tmp_path / "synth.json").read_text())
    assert summary["num"] == 5 and summary["image_size"] == 32 and summary["seed"] == 4
    assert summary["attributes"] == {
        "shape": list(world.SHAPES),
        "color": list(world.COLORS),
    }  # what evaluation reads captions with


def test_importing_the_synthetic_world_does_not_import_torch():
    code = "import sys, miniature.world; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
