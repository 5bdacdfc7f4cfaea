"""3D ground truth: surface voxels in TRELLIS's frame, their storage in the synthetic shards."""

import numpy as np
import pytest
import trimesh

from gap3d.data.occupancy import decode_occupancy, downsample, encode_occupancy, read_occupancy, surface_voxels
from miniature import world as synth
from miniature.shards import write_synth


def box_shell(low: int, high: int, resolution: int) -> np.ndarray:
    """Voxels [low, high] on every axis with at least one index at low or high: the surface of a box."""
    grid = np.zeros((resolution,) * 3, dtype=bool)
    grid[low : high + 1, low : high + 1, low : high + 1] = True
    grid[low + 1 : high, low + 1 : high, low + 1 : high] = False
    return grid


def test_surface_of_a_box_marks_exactly_the_voxels_its_faces_cross():
    # Faces at +-0.3 lie inside voxels 1 and 6 of an 8-grid (centres at (i + 0.5) / 8 - 0.5), never on a voxel border.
    box = trimesh.creation.box(extents=(0.6, 0.6, 0.6))
    grid = surface_voxels(np.asarray(box.vertices), np.asarray(box.faces), resolution=8)
    np.testing.assert_array_equal(grid, box_shell(1, 6, 8))


def test_surface_voxels_follow_trellis_axis_order():
    # A thin slab in x only: the occupied voxels spread over y and z and stay in one x column.
    slab = trimesh.creation.box(extents=(0.05, 0.8, 0.8))
    slab.apply_translation((0.3, 0.0, 0.0))
    grid = surface_voxels(np.asarray(slab.vertices), np.asarray(slab.faces), resolution=8)
    assert set(np.argwhere(grid)[:, 0]) == {6}


def test_vertices_outside_the_unit_cube_are_rejected():
    box = trimesh.creation.box(extents=(1.5, 1.0, 1.0))
    with pytest.raises(ValueError, match="unit cube"):
        surface_voxels(np.asarray(box.vertices), np.asarray(box.faces), resolution=8)


def test_downsample_marks_a_coarse_voxel_when_any_fine_voxel_is_occupied():
    fine = np.zeros((4, 4, 4), dtype=bool)
    fine[3, 0, 1] = True
    coarse = downsample(fine, 2)
    expected = np.zeros((2, 2, 2), dtype=bool)
    expected[1, 0, 0] = True
    np.testing.assert_array_equal(coarse, expected)
    with pytest.raises(ValueError, match="does not divide"):
        downsample(fine, 3)


def test_occupancy_member_round_trips_and_is_a_third_of_a_bit_per_voxel():
    grid = np.random.default_rng(0).random((16, 16, 16)) < 0.1
    payload = encode_occupancy(grid)
    np.testing.assert_array_equal(decode_occupancy(payload), grid)
    assert len(payload) < 16**3 // 8 + 200  # packed bits plus the .npy header


def test_a_member_that_is_not_an_occupancy_grid_names_itself():
    with pytest.raises(ValueError, match="shard-0.tar: 7.occupancy.npy"):
        decode_occupancy(b"not numpy", "shard-0.tar: 7.occupancy.npy")


def test_each_synthetic_sample_carries_the_occupancy_of_its_own_mesh(tmp_path):
    write_synth(str(tmp_path), 6, seed=3, image_size=32)
    grids = read_occupancy(str(tmp_path))
    assert sorted(grids) == [f"{i:08d}" for i in range(6)]
    for key, grid in grids.items():
        scene = synth.sample_scene(3, int(key))
        np.testing.assert_array_equal(grid, synth.scene_occupancy(scene))
        assert grid.shape == (64, 64, 64) and 0.005 < grid.mean() < 0.1  # a shell, not a solid


def test_occupancy_differs_between_shapes_and_turns_with_yaw():
    cube = synth.Scene("cube", "red", 0.0, 20.0, 0.0, "a red cube")
    turned = synth.Scene("cube", "red", 30.0, 20.0, 0.0, "a red cube")
    sphere = synth.Scene("sphere", "red", 0.0, 20.0, 0.0, "a red sphere")
    a, b, c = (synth.scene_occupancy(s, 32) for s in (cube, turned, sphere))
    assert (a != b).any() and (a != c).any()


def test_a_shard_that_is_not_a_tar_is_named_in_the_error(tmp_path):
    (tmp_path / "train-000000.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="train-000000.tar is not a readable tar"):
        read_occupancy(str(tmp_path))
