"""The protocol renderer (gap3d.render): TRELLIS's camera convention, vertex colours, black background, crops."""

import numpy as np
import pytest
import trimesh

from gap3d.render import Protocol, camera_frame, crop_to_object, render, render_views

SMALL = Protocol(resolution=64)


def box(extents=(0.6, 0.6, 0.6)) -> tuple[np.ndarray, np.ndarray]:
    mesh = trimesh.creation.box(extents=extents)
    return np.asarray(mesh.vertices), np.asarray(mesh.faces)


def test_the_protocol_is_the_papers():
    protocol = Protocol()
    assert (protocol.resolution, protocol.fov_deg, protocol.radius, protocol.pitch_deg) == (512, 40.0, 2.0, 30.0)
    assert protocol.yaws == [0, 45, 90, 135, 180, 225, 270, 315]
    assert [protocol.yaws[i] for i in protocol.fd_views] == [0, 90, 180, 270]


def test_yaw_zero_puts_the_camera_on_plus_y_looking_at_the_origin_from_above():
    centre, basis = camera_frame(0.0, 30.0, 2.0)
    np.testing.assert_allclose(centre, [0.0, 2 * np.cos(np.pi / 6), 1.0], atol=1e-12)
    np.testing.assert_allclose(basis[2], -centre / 2.0, atol=1e-12)  # forward
    assert basis[1][2] > 0  # up points up


def test_a_mesh_renders_in_its_vertex_colours_on_black():
    vertices, faces = box()
    image = render(vertices, faces, np.tile([1.0, 0.0, 0.0], (len(vertices), 1)), 0.0, 30.0, SMALL)
    covered = image.max(axis=2) > 0
    assert image[0, 0].tolist() == [0, 0, 0] and covered[32, 32]
    assert (image[covered][:, 1:] == 0).all() and image[covered][:, 0].min() > 0


def test_a_mesh_without_colours_is_grey_and_an_empty_mesh_is_black():
    vertices, faces = box()
    grey = render(vertices, faces, None, 0.0, 30.0, SMALL)[32, 32]
    assert grey[0] == grey[1] == grey[2] > 0
    empty = render_views(np.zeros((0, 3)), np.zeros((0, 3), np.int64), None, SMALL)
    assert len(empty) == 8 and all(view.max() == 0 for view in empty)


def test_a_shape_symmetric_about_z_looks_the_same_from_every_yaw():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.4)
    turned = sphere.copy()
    turned.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, [0, 0, 1]))
    first = render(sphere.vertices, sphere.faces, None, 0.0, 30.0, SMALL).astype(int)
    quarter = render(turned.vertices, turned.faces, None, 90.0, 30.0, SMALL).astype(int)
    assert np.abs(first - quarter).max() <= 1  # the turned sphere seen from a turned camera: the same picture


def test_a_wider_box_covers_more_pixels_and_stays_in_frame():
    small = render(*box((0.3, 0.3, 0.3)), None, 0.0, 30.0, SMALL).max(axis=2) > 0
    large = render(*box((0.8, 0.8, 0.8)), None, 0.0, 30.0, SMALL).max(axis=2) > 0
    assert large.sum() > 4 * small.sum()
    assert not large[0].any() and not large[-1].any() and not large[:, 0].any() and not large[:, -1].any()


def test_the_conditioning_crop_fills_the_frame_to_one_over_the_margin():
    image = np.zeros((100, 100, 3), np.uint8)
    image[40:60, 30:50] = 255
    crop = crop_to_object(image, 60) > 127  # LANCZOS rings a few pixels past the edges
    rows, cols = np.nonzero(crop.any(axis=2))
    assert (rows.max() - rows.min() + 1) == pytest.approx(60 / 1.2, abs=2)
    assert (cols.max() - cols.min() + 1) == pytest.approx(60 / 1.2, abs=2)
