"""The synthetic objects' ground truth as fields in TRELLIS's frame: signed distance (negative inside) and colour.

These supervise the tiny TRELLIS's stage 2, whose mesh decoder predicts a signed distance and a colour at every
corner of its fine cubes. Distances are exact for the analytic solids the meshes approximate (a box, a sphere, a
cone, a torus and a cylinder: solids of revolution are measured in their (radius, height) half-plane), taken
through the same centring, scaling and turn that `world.object_mesh` applies, so the zero set is the object's
surface to within the meshes' faceting.
"""

import functools

import numpy as np

from miniature.world import COLORS, Scene, object_frame, primitive_mesh

TORUS_TILT_DEG = 70.0  # world.primitive_mesh stands the ring up by this turn about x
CONE = (1.0, 1.8)  # base radius, height: apex on +z, base at z = 0
TORUS = (1.0, 0.38)  # major, minor radius, about z before the tilt
PILLAR = (0.28, 1.0)  # radius, half height
BOXES = {"cube": (0.5, 0.5, 0.5), "slab": (1.0, 0.6, 0.175)}  # half extents


def _box(p: np.ndarray, half: tuple[float, float, float]) -> np.ndarray:
    q = np.abs(p) - np.asarray(half)
    return np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(axis=-1), 0.0)


def _segment_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from 2-D points (P, 2) to the segment a-b."""
    ab = b - a
    t = np.clip(((points - a) @ ab) / (ab @ ab), 0.0, 1.0)
    return np.linalg.norm(points - (a + t[:, None] * ab), axis=-1)


def _revolved(p: np.ndarray, outline: list[tuple[float, float]], inside: np.ndarray) -> np.ndarray:
    """Signed distance to a solid of revolution about z whose (radius, height) outline is the polyline `outline`."""
    rz = np.stack([np.linalg.norm(p[:, :2], axis=-1), p[:, 2]], axis=-1)
    corners = [np.asarray(point) for point in outline]
    distance = np.min([_segment_distance(rz, a, b) for a, b in zip(corners[:-1], corners[1:])], axis=0)
    return np.where(inside, -distance, distance)


def primitive_sdf(shape: str, p: np.ndarray) -> np.ndarray:
    """Signed distance (P,) of points (P, 3) to `shape`'s solid in the frame trimesh built its mesh in."""
    if shape in BOXES:
        return _box(p, BOXES[shape])
    if shape == "sphere":
        return np.linalg.norm(p, axis=-1) - 1.0
    r, z = np.linalg.norm(p[:, :2], axis=-1), p[:, 2]
    if shape == "cone":
        radius, height = CONE
        inside = (z >= 0.0) & (z <= height) & (r <= radius * (1.0 - z / height))
        return _revolved(p, [(0.0, 0.0), (radius, 0.0), (0.0, height)], inside)
    if shape == "pillar":
        radius, half = PILLAR
        inside = (np.abs(z) <= half) & (r <= radius)
        return _revolved(p, [(0.0, -half), (radius, -half), (radius, half), (0.0, half)], inside)
    if shape == "torus":
        tilt = np.deg2rad(TORUS_TILT_DEG)
        untilt = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(tilt), np.sin(tilt)], [0.0, -np.sin(tilt), np.cos(tilt)]])
        flat = p @ untilt.T  # the inverse of the tilt world.primitive_mesh applied
        major, minor = TORUS
        return np.hypot(np.linalg.norm(flat[:, :2], axis=-1) - major, flat[:, 2]) - minor
    raise ValueError(f"no signed distance for shape {shape!r}")


@functools.cache
def _primitive_frame(shape: str) -> tuple[np.ndarray, float]:
    """(centre, half extent) that `world.base_mesh` normalises the primitive's mesh by."""
    vertices = np.asarray(primitive_mesh(shape).vertices)
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    return (low + high) / 2, float((high - low).max() / 2)


def scene_sdf(scene: Scene, points: np.ndarray) -> np.ndarray:
    """Signed distance (P,) of points (P, 3) in TRELLIS's frame to the scene's object (world.object_mesh's solid)."""
    turn, centre, scale = object_frame(scene)
    base = (points * scale + centre) @ turn  # the inverse of world.object_mesh's (base @ turn.T - centre) / scale
    primitive_centre, primitive_half = _primitive_frame(scene.shape)
    primitive = base * primitive_half + primitive_centre
    return primitive_sdf(scene.shape, primitive) / primitive_half / scale


def scene_color(scene: Scene) -> np.ndarray:
    """The object's colour, RGB in [0, 1] (objects are one colour throughout)."""
    return np.asarray(COLORS[scene.color], dtype=np.float64)
