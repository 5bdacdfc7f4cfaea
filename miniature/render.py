"""A tiny numpy renderer: z-buffered triangle rasterisation, flat Lambert shading, fixed camera.

Enough to draw single primitives on a black background (the look of TRELLIS's training renders)
for the synthetic dataset. World axes: x to the right, y away from the camera, z up.
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Camera:
    """A pinhole camera on the -y side of the origin, looking at it, tilted down by `elevation_deg`."""

    elevation_deg: float = 20.0  # angle above the horizon the camera looks down from
    distance: float = 5.5  # from the camera to the origin, in world units
    fov_deg: float = 45.0  # full horizontal and vertical field of view

    def __post_init__(self):
        if not 0.0 < self.fov_deg < 180.0:
            raise ValueError(f"Camera.fov_deg must be in (0, 180), got {self.fov_deg}")
        if self.distance <= 0.0:
            raise ValueError(f"Camera.distance must be positive, got {self.distance}")

    def position(self) -> np.ndarray:
        """Camera centre in world coordinates, (3,)."""
        elevation = np.deg2rad(self.elevation_deg)
        return np.array([0.0, -np.cos(elevation), np.sin(elevation)]) * self.distance

    def basis(self) -> np.ndarray:
        """Rows right, up, forward of the camera frame in world coordinates, (3, 3)."""
        forward = -self.position() / self.distance
        right = np.cross(forward, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right)
        up = np.cross(right, forward)
        return np.stack([right, up, forward])


DEFAULT_CAMERA = Camera()
# Light comes from the upper left, slightly in front, so three faces of a cube read differently.
LIGHT_DIRECTION = np.array([-0.5, -0.6, 0.75]) / np.linalg.norm([-0.5, -0.6, 0.75])
AMBIENT = 0.3  # fraction of the base colour every visible face gets, lit or not


def project(vertices: np.ndarray, image_size: int, camera: Camera) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (V, 2) (x right, y down, pixel centres at +0.5) and depths (V,) of world points (V, 3)."""
    view = (vertices - camera.position()) @ camera.basis().T  # (V, 3): right, up, depth
    depth = view[:, 2]
    if np.any(depth <= 1e-6):
        raise ValueError("a vertex lies behind the camera; move the object or the camera further apart")
    focal = 0.5 * image_size / np.tan(np.deg2rad(camera.fov_deg) / 2)
    x = 0.5 * image_size + focal * view[:, 0] / depth
    y = 0.5 * image_size - focal * view[:, 1] / depth
    return np.stack([x, y], axis=1), depth


def _edge(a: np.ndarray, b: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Twice the signed area of triangle (a, b, p) for batches of 2-D points (N, 2) -> (N,)."""
    return (b[:, 0] - a[:, 0]) * (p[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (p[:, 0] - a[:, 0])


def rasterize(
    screen: np.ndarray, depth: np.ndarray, faces: np.ndarray, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest face per covered pixel: flat pixel indices (N,) and face indices (N,).

    Every face is tested against the pixel centres of its bounding box in one vectorised pass,
    then a stable sort by (pixel, depth) keeps the nearest candidate, so ties resolve the same way
    on every run.
    """
    corners = screen[faces]  # (F, 3, 2)
    low = np.clip(np.ceil(corners.min(axis=1) - 0.5), 0, image_size).astype(np.int64)  # (F, 2)
    high = np.clip(np.floor(corners.max(axis=1) - 0.5), -1, image_size - 1).astype(np.int64)  # (F, 2)
    width = np.maximum(high[:, 0] - low[:, 0] + 1, 0)
    height = np.maximum(high[:, 1] - low[:, 1] + 1, 0)
    counts = width * height
    face = np.repeat(np.arange(len(faces)), counts)  # (N,) candidate face per candidate pixel
    local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    px = low[face, 0] + local % width[face]
    py = low[face, 1] + local // width[face]
    centre = np.stack([px + 0.5, py + 0.5], axis=1)
    a, b, c = corners[face, 0], corners[face, 1], corners[face, 2]
    area = _edge(a, b, c)
    with np.errstate(divide="ignore", invalid="ignore"):
        bary = np.stack([_edge(b, c, centre), _edge(c, a, centre), _edge(a, b, centre)], axis=1) / area[:, None]
    inside = (area != 0) & np.all(bary >= 0, axis=1)
    face, px, py, bary = face[inside], px[inside], py[inside], bary[inside]
    # Perspective-correct depth: 1/z interpolates linearly in screen space.
    inverse_depth = np.sum(bary / depth[faces[face]], axis=1)
    pixel = py * image_size + px
    order = np.lexsort((-inverse_depth, pixel))
    pixel, face = pixel[order], face[order]
    first = np.ones(len(pixel), dtype=bool)
    first[1:] = pixel[1:] != pixel[:-1]
    return pixel[first], face[first]


def render_mesh(
    vertices: np.ndarray,
    faces: np.ndarray,
    color: tuple[float, float, float] | np.ndarray,
    image_size: int,
    camera: Camera = DEFAULT_CAMERA,
    light: np.ndarray = LIGHT_DIRECTION,
) -> np.ndarray:
    """RGB image (S, S, 3) uint8 of a closed mesh (V, 3) / (F, 3) in `color` (RGB in [0, 1], or one per vertex
    (V, 3): each face takes its corners' mean) on black, lit from `light` (unit, 3)."""
    color = np.asarray(color, dtype=np.float64)
    face_color = color[faces].mean(axis=1) if color.ndim == 2 else np.broadcast_to(color, (len(faces), 3))
    triangles = vertices[faces]  # (F, 3, 3)
    normals = np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    # Back faces of a closed mesh are always hidden; dropping them halves the rasterisation work.
    facing = np.einsum("fd,fd->f", normals, camera.position() - triangles.mean(axis=1)) > 0
    faces, normals, face_color = faces[facing], normals[facing], face_color[facing]
    screen, depth = project(vertices, image_size, camera)
    pixel, face = rasterize(screen, depth, faces, image_size)
    shade = AMBIENT + (1.0 - AMBIENT) * np.clip(normals @ light, 0.0, 1.0)  # (F,)
    face_rgb = np.clip(shade[:, None] * face_color * 255.0 + 0.5, 0, 255).astype(np.uint8)  # (F, 3)
    image = np.zeros((image_size * image_size, 3), dtype=np.uint8)
    image[pixel] = face_rgb[face]
    return image.reshape(image_size, image_size, 3)


def crop_to_object(image: np.ndarray, size: int, margin: float = 1.2) -> np.ndarray:
    """TRELLIS's conditioning crop: the square of `margin` x the object's larger bounding-box side, centred on the
    box, on black, resized to (size, size, 3). image: (H, W, 3) uint8 with a black background."""
    from PIL import Image

    rows, cols = np.nonzero(image.max(axis=2))
    if rows.size == 0:
        raise ValueError("the image holds no object (every pixel is black)")
    centre_y, centre_x = (rows.min() + rows.max() + 1) / 2, (cols.min() + cols.max() + 1) / 2
    half = margin * max(rows.max() + 1 - rows.min(), cols.max() + 1 - cols.min()) / 2
    box = tuple(int(round(v)) for v in (centre_x - half, centre_y - half, centre_x + half, centre_y + half))
    cropped = Image.fromarray(image).crop(box)  # regions outside the image come back black
    return np.asarray(cropped.resize((size, size), Image.Resampling.LANCZOS))
