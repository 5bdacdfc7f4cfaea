"""Surface shells of simple solids on a voxel grid, as TRELLIS's stage 1 decodes them (the voxels the surface
crosses), for the meshing tests."""

import numpy as np
import scipy.ndimage


def shell(resolution: int, inside) -> np.ndarray:
    """bool (R, R, R): the voxels of a solid (`inside(x, y, z)` on voxel centres) that touch its outside."""
    centres = (np.arange(resolution) + 0.5) / resolution - 0.5
    solid = inside(*np.meshgrid(centres, centres, centres, indexing="ij"))
    return solid & ~scipy.ndimage.binary_erosion(solid)


def as_logits(occupied: np.ndarray) -> np.ndarray:
    return np.where(occupied, 1.0, -1.0)


def sphere(x, y, z):
    return x**2 + y**2 + z**2 < 0.35**2


def ring(x, y, z):
    return (np.sqrt(x**2 + y**2) - 0.25) ** 2 + z**2 < 0.1**2


def cube(x, y, z):
    return np.maximum(np.maximum(abs(x), abs(y)), abs(z)) < 0.3
