"""Coarse mesh of a stage-1 occupancy grid: marching tetrahedra on the decoder's logits.

Each grid cell is split into six tetrahedra around its main diagonal (the Kuhn split, consistent
between neighbouring cells), so every case is unambiguous and the surface is closed and
2-manifold: watertight. Vertices are placed where the linearly interpolated logit crosses 0 and are
shared through the lattice edge they lie on. Voxel i of an R-grid has its centre at (i + 0.5) / R - 0.5,
TRELLIS's convention, so the mesh lies inside [-0.5, 0.5]^3.

Stage 1 decodes a surface shell (the voxels the object's surface crosses), not a solid: meshed as it is, a shell
gives an outer and an inner wall, joined wherever the shell has a pinhole. `fill_enclosed` fills what the shell
encloses first, so the mesh is the object's outer surface alone.
"""

import itertools

import numpy as np
import scipy.ndimage
import torch
import trimesh

# Corner k of a unit cell sits at offset (k & 1, k >> 1 & 1, k >> 2 & 1).
_CORNERS = np.array([[k & 1, k >> 1 & 1, k >> 2 & 1] for k in range(8)])
# Six tetrahedra 0 -> e_a -> e_a + e_b -> 7, one per axis order (a, b, c).
_TETS = np.array([[0, 1 << a, (1 << a) | (1 << b), 7] for a, b, _ in itertools.permutations(range(3))])
_TET_EDGES = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
# Keep crossing points off the lattice points so no triangle collapses to zero area.
_CROSSING_MARGIN = 0.05


def _edge(i: int, j: int) -> int:
    return _TET_EDGES.index((min(i, j), max(i, j)))


def _case_triangles(code: int) -> list[tuple[int, int, int]]:
    """Triangles (as tet-edge indices) for the inside pattern `code` (bit i = tet vertex i inside)."""
    inside = [i for i in range(4) if code >> i & 1]
    outside = [i for i in range(4) if not code >> i & 1]
    if len(inside) in (1, 3):
        lone = inside[0] if len(inside) == 1 else outside[0]
        others = [i for i in range(4) if i != lone]
        return [tuple(_edge(lone, other) for other in others)]
    if len(inside) == 2:
        (a, b), (c, d) = inside, outside
        quad = [_edge(a, c), _edge(a, d), _edge(b, d), _edge(b, c)]  # a cycle around the quad
        return [(quad[0], quad[1], quad[2]), (quad[0], quad[2], quad[3])]
    return []


_CASES = [_case_triangles(code) for code in range(16)]


def empty_mesh() -> trimesh.Trimesh:
    return trimesh.Trimesh(vertices=np.zeros((0, 3)), faces=np.zeros((0, 3), dtype=np.int64), process=False)


def fill_enclosed(field: torch.Tensor | np.ndarray) -> np.ndarray:
    """(R, R, R) logits (inside > 0) -> the same logits with every voxel the shell encloses set inside.

    Enclosed means unreachable from the grid's border through empty voxels once the shell is thickened by one voxel,
    which closes pinholes a voxel wide; the thickening is taken back, so the outer surface stays where it was.
    """
    values = np.asarray(field.detach().float().cpu() if isinstance(field, torch.Tensor) else field, dtype=np.float64)
    occupied = values > 0
    enclosed = scipy.ndimage.binary_erosion(scipy.ndimage.binary_fill_holes(scipy.ndimage.binary_dilation(occupied)))
    filled = values.copy()
    filled[enclosed & ~occupied] = max(float(values.max()), 1.0)
    return filled


def occupancy_mesh(field: torch.Tensor | np.ndarray) -> trimesh.Trimesh:
    """(R, R, R) logits (inside > 0) or bool occupancy -> watertight mesh in [-0.5, 0.5]^3 (empty if none inside)."""
    values = np.asarray(field.detach().float().cpu() if isinstance(field, torch.Tensor) else field)
    if values.ndim != 3 or len(set(values.shape)) != 1:
        raise ValueError(f"occupancy grid must be a cube (R, R, R), got shape {values.shape}")
    values = np.where(values, 1.0, -1.0) if values.dtype == bool else values.astype(np.float64)
    if not (values > 0).any():
        return empty_mesh()
    resolution = values.shape[0]
    # Pad with a value so negative that crossings towards it stay inside the box.
    padded = np.pad(values, 1, constant_values=-(np.abs(values).max() + 1.0))
    side = padded.shape[0]
    inside = padded > 0
    # Cells (origin corner indices) whose 8 corners are not all on one side.
    corner_inside = np.stack(
        [inside[dx : side - 1 + dx, dy : side - 1 + dy, dz : side - 1 + dz] for dx, dy, dz in _CORNERS], axis=-1
    )
    mixed = corner_inside.any(-1) & ~corner_inside.all(-1)
    origins = np.argwhere(mixed)  # (M, 3)
    strides = np.array([side * side, side, 1])
    corner_ids = (origins @ strides)[:, None] + _CORNERS @ strides  # (M, 8) flat lattice indices
    tet_ids = corner_ids[:, _TETS].reshape(-1, 4)  # (6M, 4)
    flat = padded.reshape(-1)
    tet_values = flat[tet_ids]
    codes = ((tet_values > 0) * (1 << np.arange(4))).sum(-1)
    faces_by_edge, face_tets = [], []
    for code, triangles in enumerate(_CASES):
        selected = np.nonzero(codes == code)[0]
        for triangle in triangles:
            faces_by_edge.append(np.stack([np.broadcast_to(e, selected.shape) for e in triangle], -1))
            face_tets.append(selected)
    edge_of_face = np.concatenate(faces_by_edge)  # (F, 3) tet-edge index per face corner
    face_tet = np.concatenate(face_tets)  # (F,)
    edge_ends = np.array(_TET_EDGES)
    ends_a = tet_ids[face_tet[:, None], edge_ends[edge_of_face, 0]]  # (F, 3) lattice index of each edge end
    ends_b = tet_ids[face_tet[:, None], edge_ends[edge_of_face, 1]]
    low, high = np.minimum(ends_a, ends_b), np.maximum(ends_a, ends_b)
    keys, faces = np.unique(low * flat.size + high, return_inverse=True)
    faces = faces.reshape(-1, 3)
    key_low, key_high = keys // flat.size, keys % flat.size
    f_low, f_high = flat[key_low], flat[key_high]
    crossing = np.clip(f_low / (f_low - f_high), _CROSSING_MARGIN, 1.0 - _CROSSING_MARGIN)[:, None]
    lattice = _lattice_points(key_low, side), _lattice_points(key_high, side)
    grid_points = lattice[0] + crossing * (lattice[1] - lattice[0])
    vertices = (grid_points - 0.5) / resolution - 0.5  # padded index j is voxel j - 1
    faces = _orient_outwards(vertices, faces, _lattice_points(tet_ids[face_tet], side), tet_values[face_tet] > 0)
    return trimesh.Trimesh(vertices=vertices, faces=faces, process=False)


def _lattice_points(ids: np.ndarray, side: int) -> np.ndarray:
    """Flat indices into a (side, side, side) lattice -> float (..., 3) lattice coordinates."""
    return np.stack(np.unravel_index(ids, (side, side, side)), -1).astype(np.float64)


def _orient_outwards(
    vertices: np.ndarray, faces: np.ndarray, tet_points: np.ndarray, tet_inside: np.ndarray
) -> np.ndarray:
    """Flip faces whose normal points from the tetrahedron's outside corners towards its inside ones."""
    corners = vertices[faces]
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    weights = np.where(tet_inside, -1.0 / tet_inside.sum(-1, keepdims=True), 1.0 / (~tet_inside).sum(-1, keepdims=True))
    outward = (weights[..., None] * tet_points).sum(1)  # mean(outside corners) - mean(inside corners)
    flip = (normals * outward).sum(-1) < 0
    faces = faces.copy()
    faces[flip] = faces[flip][:, ::-1]
    return faces
