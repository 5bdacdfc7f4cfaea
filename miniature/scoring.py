"""Scoring what the service returns in the miniature: the asset's shape, how well it matches a true object, and its
colour.

A served GLB is voxelised back onto the decoder's structure grid as a surface shell (the form of the ground truth,
gap3d.data.occupancy) and named by the true grid it overlaps most. A prompt names a shape and a colour but no turn
of the object, so its asset's IoU is taken against the best-matching true object of the prompted shape.
"""

from collections.abc import Sequence

import numpy as np
import torch
import trimesh

from gap3d.data.occupancy import surface_voxels
from gap3d.metrics import class_report
from gap3d.trellis.mesh_export import load_mesh
from gap3d.trellis.structure_metrics import nearest_labels, pairwise_iou


def asset_structure(glb: bytes, resolution: int) -> torch.Tensor:
    """bool (R, R, R): the voxels of TRELLIS's grid that a served GLB's surface crosses."""
    return mesh_structure(load_mesh(glb), resolution)


def mesh_structure(mesh: trimesh.Trimesh, resolution: int) -> torch.Tensor:
    """bool (R, R, R): the voxels of TRELLIS's grid that a mesh's surface crosses."""
    vertices = np.clip(np.asarray(mesh.vertices, dtype=np.float64), -0.5, 0.5)
    return torch.from_numpy(surface_voxels(vertices, np.asarray(mesh.faces), resolution))


def dominant_color(mesh: trimesh.Trimesh, palette: dict[str, tuple[float, float, float]]) -> str | None:
    """The palette colour most of the mesh's vertices are nearest to (RGB distance), or None for a mesh without
    vertex colours (a coarse, stage-1 asset)."""
    if mesh.visual.kind != "vertex" or len(mesh.vertices) == 0:
        return None
    rgb = np.asarray(mesh.visual.vertex_colors)[:, :3] / 255.0
    names = list(palette)
    nearest = np.linalg.norm(rgb[:, None] - np.asarray([palette[n] for n in names])[None], axis=-1).argmin(axis=1)
    return names[int(np.bincount(nearest, minlength=len(names)).argmax())]


def served_asset_report(
    structures: torch.Tensor, prompted: Sequence[str], references: torch.Tensor, reference_shapes: Sequence[str]
) -> dict:
    """Structures (B, R, R, R) of the assets returned for prompts naming `prompted` shapes, against true grids:
    {"shape": class_report of the nearest true grid's shape, "iou_per_shape": {shape: mean best IoU with a true
    object of the prompted shape}}."""
    iou = pairwise_iou(structures, references)  # (B, M)
    kinds = np.asarray(reference_shapes)
    best = [float(iou[row, torch.from_numpy(kinds == shape)].max()) for row, shape in enumerate(prompted)]
    by_shape: dict[str, list[float]] = {}
    for shape, value in zip(prompted, best):
        by_shape.setdefault(shape, []).append(value)
    return {
        "shape": class_report(prompted, nearest_labels(structures, references, reference_shapes)),
        "iou_per_shape": {shape: sum(values) / len(values) for shape, values in sorted(by_shape.items())},
    }
