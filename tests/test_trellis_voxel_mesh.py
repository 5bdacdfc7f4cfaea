"""Coarse mesh of an occupancy grid: watertight, outward-facing, inside TRELLIS's [-0.5, 0.5]^3 box; a surface
shell meshes to its outer surface alone."""

import math

import numpy as np
import pytest
import torch

from gap3d.trellis.voxel_mesh import fill_enclosed, occupancy_mesh
from tests.shells import as_logits, ring, shell, sphere


def test_single_voxel_gives_a_closed_outward_surface_around_its_centre():
    grid = np.zeros((8, 8, 8), dtype=bool)
    grid[3, 3, 3] = True
    mesh = occupancy_mesh(grid)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume > 0  # positive volume = normals point outwards
    centre = (3 + 0.5) / 8 - 0.5
    np.testing.assert_allclose(mesh.vertices.mean(0), [centre] * 3, atol=1e-9)
    # crossings sit midway between voxel centres: the surface stays within half a voxel of the centre
    assert np.abs(mesh.vertices - centre).max() <= 0.5 / 8 + 1e-9


def test_voxels_touching_only_along_an_edge_still_give_a_watertight_mesh():
    grid = np.zeros((6, 6, 6), dtype=bool)
    grid[1, 1, 1] = grid[2, 2, 1] = grid[3, 3, 3] = grid[2, 2, 2] = True
    mesh = occupancy_mesh(grid)
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0


def test_all_occupied_grid_fills_the_box_without_leaving_it():
    mesh = occupancy_mesh(np.ones((16, 16, 16), dtype=bool))
    assert mesh.is_watertight
    assert mesh.bounds.min() >= -0.5 and mesh.bounds.max() <= 0.5
    assert mesh.bounds.min() < -0.45 and mesh.bounds.max() > 0.45


def test_empty_grid_gives_an_empty_mesh():
    mesh = occupancy_mesh(torch.full((8, 8, 8), -3.0))
    assert len(mesh.faces) == 0 and len(mesh.vertices) == 0


def test_logits_are_interpolated_to_the_zero_crossing():
    # Signed distance to a sphere of radius 0.3 sampled at voxel centres: volume close to the sphere's.
    centres = (np.arange(48) + 0.5) / 48 - 0.5
    x, y, z = np.meshgrid(centres, centres, centres, indexing="ij")
    mesh = occupancy_mesh(torch.tensor(0.3 - np.sqrt(x**2 + y**2 + z**2)))
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * 0.3**3, rel=0.03)


def test_non_cubic_grid_is_rejected():
    with pytest.raises(ValueError, match="cube"):
        occupancy_mesh(np.ones((4, 4, 5), dtype=bool))


def test_a_shell_meshes_to_one_closed_outer_surface_without_its_inner_wall():
    mesh = occupancy_mesh(fill_enclosed(as_logits(shell(32, sphere))))
    assert mesh.is_watertight and len(mesh.split(only_watertight=False)) == 1
    assert mesh.euler_number == 2  # genus 0: a shell meshed as it is has an inner wall too
    assert mesh.volume == pytest.approx(4 / 3 * np.pi * 0.35**3, rel=0.1)


def test_filling_keeps_the_hole_of_a_ring():
    mesh = occupancy_mesh(fill_enclosed(as_logits(shell(32, ring))))
    assert mesh.is_watertight and mesh.euler_number == 0  # genus 1


def test_a_pinhole_in_the_shell_does_not_open_it_to_its_inner_wall():
    occupied = shell(32, sphere)
    occupied[16, 16, np.argmax(occupied[16, 16])] = False  # one shell voxel missing on the sphere's side
    mesh = occupancy_mesh(fill_enclosed(as_logits(occupied)))
    assert len(mesh.split(only_watertight=False)) == 1 and mesh.euler_number == 2
