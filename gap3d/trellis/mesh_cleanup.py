"""Cheap removal of invisible and stray parts of an extracted mesh.

TRELLIS's GLB post-processing renders the mesh from many views and deletes faces no view sees. We do
the part of that which needs no renderer: split the mesh into face-connected components and drop
(1) components with negative signed volume, which are cavity walls (both extractors orient faces from
inside to outside, so a closed surface around an empty pocket inside the solid faces inwards and is
never visible from outside), and (2) components with fewer than `min_faces` faces (specks).
Open components (touching the grid border) have a meaningless sign and are kept unless specks.
"""

import logging

import numpy as np
import trimesh
from trimesh.graph import connected_component_labels

logger = logging.getLogger(__name__)

# Components below this many faces are dropped by default: a few voxels' worth of surface.
DEFAULT_MIN_COMPONENT_FACES = 48


def signed_volumes(mesh: trimesh.Trimesh, labels: np.ndarray, count: int) -> np.ndarray:
    """(count,) signed volume of each component: sum over its faces of det(v0, v1, v2) / 6."""
    corners = mesh.vertices[mesh.faces]  # (F, 3, 3)
    dets = np.einsum("ij,ij->i", corners[:, 0], np.cross(corners[:, 1], corners[:, 2])) / 6.0
    return np.bincount(labels, weights=dets, minlength=count)


def closed_components(mesh: trimesh.Trimesh, labels: np.ndarray, count: int) -> np.ndarray:
    """(count,) bool: every edge of the component is shared by exactly two of its faces."""
    edges = np.sort(mesh.faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    _, inverse, uses = np.unique(edges, axis=0, return_inverse=True, return_counts=True)
    open_edge = uses[inverse.reshape(-1)] != 2  # (3F,)
    return np.bincount(np.repeat(labels, 3), weights=open_edge, minlength=count) == 0


def remove_hidden_components(mesh: trimesh.Trimesh, min_faces: int = DEFAULT_MIN_COMPONENT_FACES) -> trimesh.Trimesh:
    """`mesh` without inward-facing closed components (cavity walls) and components below `min_faces` faces."""
    if len(mesh.faces) == 0:
        return mesh
    labels = connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    count = int(labels.max()) + 1
    sizes = np.bincount(labels, minlength=count)
    cavity = closed_components(mesh, labels, count) & (signed_volumes(mesh, labels, count) < 0)
    keep_component = ~cavity & (sizes >= min_faces)
    if keep_component.all():
        return mesh
    if not keep_component.any():
        keep_component[np.argmax(sizes)] = True  # never clean a mesh away entirely
    logger.debug(
        "mesh cleanup: dropped %d cavity walls and %d specks of %d components",
        int(cavity.sum()),
        int((~keep_component & ~cavity).sum()),
        count,
    )
    cleaned = mesh.copy()
    cleaned.update_faces(keep_component[labels])
    cleaned.remove_unreferenced_vertices()
    return cleaned
