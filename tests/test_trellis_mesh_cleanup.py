"""Mesh post-processing: cavity walls and specks dropped, stage-2 voxel selection, colour-keeping simplification,
decimation within a tolerance."""

import json
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import scipy.spatial
import torch
import trimesh

from gap3d.trellis.mesh_cleanup import remove_hidden_components
from gap3d.trellis.mesh_export import export_mesh, load_mesh, simplify
from gap3d.trellis.stage2_inputs import TooManyVoxelsError, stage2_voxels, surface_mask, voxel_budget_groups
from gap3d.trellis.voxel_mesh import fill_enclosed, occupancy_mesh
from tests.shells import as_logits, cube, shell, sphere


def coloured(mesh: trimesh.Trimesh, rgb: tuple[int, int, int]) -> trimesh.Trimesh:
    mesh.visual.vertex_colors = np.tile([*rgb, 255], (len(mesh.vertices), 1)).astype(np.uint8)
    return mesh


def test_cavity_walls_and_specks_are_dropped_and_the_outer_shell_kept():
    outer = coloured(trimesh.creation.icosphere(subdivisions=3, radius=0.4), (200, 0, 0))
    cavity = trimesh.creation.icosphere(subdivisions=3, radius=0.2)
    cavity.invert()  # faces point into the pocket, as an extractor orients a cavity's wall
    speck = trimesh.creation.box(extents=(0.01, 0.01, 0.01))
    speck.apply_translation((0.45, 0.45, 0.45))
    mesh = trimesh.util.concatenate([outer, coloured(cavity, (0, 200, 0)), coloured(speck, (0, 0, 200))])
    cleaned = remove_hidden_components(mesh, min_faces=48)
    assert len(cleaned.faces) == len(outer.faces)
    assert cleaned.volume == pytest.approx(outer.volume)
    assert (cleaned.visual.vertex_colors == [200, 0, 0, 255]).all()


def test_a_clean_mesh_is_returned_unchanged():
    mesh = trimesh.creation.icosphere(subdivisions=2)
    assert remove_hidden_components(mesh) is mesh


def test_surface_mask_drops_only_enclosed_voxels():
    occupancy = torch.zeros(8, 8, 8, dtype=torch.bool)
    occupancy[1:6, 1:6, 1:6] = True
    surface = surface_mask(occupancy)
    assert int(surface.sum()) == 5**3 - 3**3
    assert not surface[2:5, 2:5, 2:5].any()


def test_stage2_voxels_keep_everything_under_the_bound_then_the_surface_then_fail():
    occupancy = torch.zeros(8, 8, 8, dtype=torch.bool)
    occupancy[1:6, 1:6, 1:6] = True
    assert stage2_voxels(occupancy, 125, "s").shape == (125, 3)
    assert stage2_voxels(occupancy, 124, "s").shape == (98, 3)
    with pytest.raises(TooManyVoxelsError, match="sample 2: .*125 voxels \\(98 on the surface\\)"):
        stage2_voxels(occupancy, 97, "sample 2")


def test_voxel_budget_groups_keep_order_and_bound():
    assert voxel_budget_groups({0: 5, 1: 4, 3: 2, 4: 9}, 10) == [[0, 1], [3], [4]]


def test_simplification_keeps_vertex_colours():
    mesh = coloured(trimesh.creation.icosphere(subdivisions=4), (10, 120, 250))
    simplified = simplify(mesh, 500)
    assert 0 < len(simplified.faces) <= 500
    assert (simplified.visual.vertex_colors == [10, 120, 250, 255]).all()


def wavy_blob_mesh() -> trimesh.Trimesh:
    axis = torch.linspace(-1, 1, 64)
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    field = 0.6 - (x**2 + (1.5 * y) ** 2 + z**2).sqrt() + 0.1 * torch.sin(7 * x) * torch.cos(4 * z)
    return occupancy_mesh(field)


@pytest.mark.parametrize("target_faces", [8000, 5000, 2000])
def test_simplifying_a_watertight_mesh_keeps_it_watertight(target_faces):
    mesh = wavy_blob_mesh()
    assert mesh.is_watertight
    simplified = simplify(mesh, target_faces)
    assert simplified.is_watertight and simplified.is_winding_consistent
    assert 0.98 * target_faces <= len(simplified.faces) <= target_faces


def test_overlapping_simplifications_in_threads_give_the_serial_results():
    mesh = wavy_blob_mesh()
    serial = simplify(mesh, 3000)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: simplify(mesh, 3000), range(8)))
    for result in results:
        np.testing.assert_array_equal(result.faces, serial.faces)
        np.testing.assert_array_equal(result.vertices, serial.vertices)


def test_glb_carries_outward_vertex_normals():
    data = export_mesh(trimesh.creation.icosphere(subdivisions=3), "glb", target_faces=None)
    header_length = struct.unpack("<I", data[12:16])[0]
    gltf = json.loads(data[20 : 20 + header_length])
    assert "NORMAL" in gltf["meshes"][0]["primitives"][0]["attributes"]
    loaded = load_mesh(data)
    assert (np.einsum("ij,ij->i", loaded.vertex_normals, loaded.vertices) > 0).all()


def coarse_mesh(inside) -> trimesh.Trimesh:
    """The coarse stage's mesh of a 32^3 shell: its enclosed solid, marched."""
    return occupancy_mesh(fill_enclosed(as_logits(shell(32, inside))))


def test_decimating_within_a_tolerance_stays_within_it_of_the_marched_surface():
    mesh = coarse_mesh(sphere)
    simplified = simplify(mesh, tolerance=0.5 / 32)
    dense = trimesh.sample.sample_surface(mesh, 200_000, seed=0)[0]
    distance = scipy.spatial.cKDTree(dense).query(simplified.vertices)[0]
    assert len(simplified.faces) < len(mesh.faces) / 4
    assert distance.max() < 1.0 / 32  # within a voxel (the sampling itself is ~0.1 voxel coarse)
    assert simplified.is_watertight


def test_the_face_count_within_a_tolerance_fits_the_shape():
    faces = {
        name: len(simplify(coarse_mesh(inside), tolerance=0.5 / 32).faces)
        for name, inside in (("cube", cube), ("sphere", sphere))
    }
    assert faces["cube"] < faces["sphere"]  # flat sides need fewer faces than a curved surface
    assert len(export_mesh(simplify(coarse_mesh(cube), tolerance=0.5 / 32))) < 200_000  # bytes of the cube's GLB
