"""The 3D evaluation set (gap3d.evalset) and `python -m cli make-evalset`: meshes + captions CSV -> renders, DINOv2
targets of the conditioning view, shards."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import trimesh

from cli import make_evalset
from gap3d.evalset import decode_png, load_mesh_file, read_captions, read_manifest, row_targets
from gap3d.render import Protocol
from miniature.meshes import write_scene_meshes
from miniature.world import sample_scene


def write_csv(path, header, rows):
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def test_a_trellis_500k_row_gets_one_of_its_captions_drawn_by_the_seed(tmp_path):
    captions = ["a wooden toy car", "a toy car", "car"]
    path = write_csv(
        tmp_path / "Toys4k.csv",
        ["sha256", "file_identifier", "captions"],
        [["ab12", "car/x.obj", json.dumps(captions)]],
    )
    first, again = read_captions(path, seed=3), read_captions(path, seed=3)
    assert first == again and first[0][0] == "ab12" and first[0][1] in captions


def test_a_plain_caption_column_and_file_identifiers_are_read(tmp_path):
    path = write_csv(tmp_path / "c.csv", ["file_identifier", "caption"], [["a.glb", "a red cube"], ["b.glb", ""]])
    assert read_captions(path) == [("a.glb", "a red cube")]  # a row without a caption has nothing to evaluate


def test_a_y_up_file_is_stood_upright_in_the_unit_cube(tmp_path):
    tall = trimesh.creation.box(extents=(0.2, 1.0, 0.3))  # tallest along y, glTF's up
    tall.export(tmp_path / "tall.glb")
    vertices, faces, colors = load_mesh_file(tmp_path / "tall.glb", up_axis="y")
    extent = vertices.max(axis=0) - vertices.min(axis=0)
    np.testing.assert_allclose(extent, [0.2, 0.3, 1.0], atol=1e-6)
    np.testing.assert_allclose(vertices.max(axis=0), -vertices.min(axis=0), atol=1e-6)


def test_make_evalset_renders_each_captioned_mesh_and_encodes_its_conditioning_view(tmp_path, tiny_config):
    indices = [index for index in range(40) if sample_scene(0, index).split == "eval"][:3]
    meshes, captions, _ = write_scene_meshes(tmp_path / "input", 0, indices)
    with open(captions, "a") as handle:
        handle.write('missing.ply,"[""a lost object""]"\n')
    out = tmp_path / "evalset"
    assert (
        make_evalset.main(
            [
                "--meshes",
                str(meshes),
                "--captions",
                str(captions),
                "--out",
                str(out),
                "--up-axis",
                "z",
                "--resolution",
                "64",
            ]
        )
        == 0
    )
    manifest = read_manifest(str(out))
    assert manifest["assets"] == 3 and manifest["protocol"]["resolution"] == 64
    assert manifest["dino"] == {"path": "tiny://dino", "image_size": tiny_config.dino.image_size}
    rows = pq.read_table(out / manifest["shards"][0]).to_pylist()
    assert [row["caption"] for row in rows] == [sample_scene(0, index).caption for index in indices]
    protocol = Protocol(resolution=64)
    for row in rows:
        assert len(row["renders"]) == 8 and decode_png(row["renders"][0]).shape == (64, 64, 3)
        assert row["cond_view"] in protocol.fd_views
        assert row_targets(row).shape == (tiny_config.aligner.num_tokens, tiny_config.aligner.token_dim)
        assert decode_png(row["renders"][0]).max() > 0  # the object is in view


def test_an_object_with_a_conditioning_image_of_its_own_is_conditioned_on_it(tmp_path, tiny_config):
    from gap3d.dino import DinoTargetEncoder
    from gap3d.render import crop_to_object

    index = next(index for index in range(40) if sample_scene(0, index).split == "eval")
    meshes, captions, images = write_scene_meshes(tmp_path / "input", 0, [index], image_size=112)
    out = tmp_path / "evalset"
    args = ["--meshes", str(meshes), "--captions", str(captions), "--out", str(out), "--up-axis", "z"]
    assert make_evalset.main([*args, "--resolution", "64", "--cond-images", str(images)]) == 0
    row = pq.read_table(out / read_manifest(str(out))["shards"][0]).to_pylist()[0]
    image = decode_png((images / f"{index:08d}.png").read_bytes())
    dino = DinoTargetEncoder.from_pretrained(tiny_config.dino)
    expected = dino.encode(crop_to_object(image, dino.image_size)[None])[0].half().float().numpy()
    assert row["cond_view"] == -1
    np.testing.assert_allclose(row_targets(row), expected)


def test_conditioning_images_given_as_the_decoders_look_are_encoded_uncropped(tmp_path, tiny_config):
    from PIL import Image

    from gap3d.data.images import resize_and_center_crop
    from gap3d.dino import DinoTargetEncoder

    index = next(index for index in range(40) if sample_scene(0, index).split == "eval")
    meshes, captions, images = write_scene_meshes(tmp_path / "input", 0, [index], image_size=96)
    out = tmp_path / "evalset"
    args = ["--meshes", str(meshes), "--captions", str(captions), "--out", str(out), "--up-axis", "z"]
    assert make_evalset.main([*args, "--resolution", "64", "--cond-images", str(images), "--cond-as-given"]) == 0
    manifest = read_manifest(str(out))
    row = pq.read_table(out / manifest["shards"][0]).to_pylist()[0]
    image = Image.open(images / f"{index:08d}.png").convert("RGB")
    dino = DinoTargetEncoder.from_pretrained(tiny_config.dino)
    expected = dino.encode(resize_and_center_crop(image, dino.image_size)[None])[0].half().float().numpy()
    assert manifest["crop_cond_images"] is False
    np.testing.assert_allclose(row_targets(row), expected)


def test_cond_as_given_without_conditioning_images_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="needs --cond-images"):
        make_evalset.main(
            ["--meshes", str(tmp_path), "--captions", "c.csv", "--out", str(tmp_path / "o"), "--cond-as-given"]
        )
