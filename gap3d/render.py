"""Renders of coloured meshes with the paper's evaluation camera (Table 3), in numpy.

The protocol (PolyannaG/GAP3D eval/, after TRELLIS's render utilities): the asset in TRELLIS's unit cube
[-0.5, 0.5]^3, z up, seen from a camera on an orbit of radius 2 at pitch 30 degrees, field of view 40 degrees, on
black at 512 px; yaws 0/90/180/270 for FD and KD, every 45 degrees for CLIP. A yaw puts the camera at
r (sin yaw cos pitch, cos yaw cos pitch, sin pitch), TRELLIS's convention. The authors render TRELLIS's Gaussians,
whose colours carry their lighting; a mesh here gets its vertex colours (interpolated) under a head-light: two-sided
Lambert plus ambient, the same for generated and ground-truth meshes. Edges are anti-aliased by supersampling.
"""

from dataclasses import dataclass

import numpy as np

DEFAULT_COLOR = (0.7, 0.7, 0.7)  # meshes without colours (TRELLIS stage 1) are grey
AMBIENT = 0.35  # share of a vertex colour every visible surface keeps, lit or not
CHUNK_CANDIDATES = 1 << 21  # pixel candidates rasterised at a time: bounds memory for large triangles
CROP_MARGIN = 1.2  # TRELLIS crops its conditioning images to 1.2x the object's bounding box


@dataclass(frozen=True)
class Protocol:
    """The paper's Table-3 cameras and image size."""

    resolution: int = 512  # rendered image side in pixels
    fov_deg: float = 40.0  # field of view, horizontal and vertical
    radius: float = 2.0  # camera distance from the origin
    pitch_deg: float = 30.0  # camera elevation above the horizon
    views: int = 8  # yaws every 360 / views degrees, from 0 (CLIP's 8)
    fd_every: int = 2  # FD/KD take every fd_every-th view: yaws 0, 90, 180, 270

    def __post_init__(self):
        if self.resolution < 16 or not 0 < self.fov_deg < 180 or self.radius <= 0:
            raise ValueError(f"protocol needs resolution >= 16, 0 < fov_deg < 180, radius > 0; got {self}")
        if self.views < 1 or self.views % self.fd_every:
            raise ValueError(f"protocol views ({self.views}) must be a positive multiple of fd_every ({self.fd_every})")

    @property
    def yaws(self) -> list[float]:
        return [index * 360.0 / self.views for index in range(self.views)]

    @property
    def fd_views(self) -> list[int]:
        """Indices of the views FD and KD use."""
        return list(range(0, self.views, self.fd_every))


def camera_frame(yaw_deg: float, pitch_deg: float, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Camera centre (3,) and rows right, up, forward (3, 3) of a camera on the orbit, looking at the origin, z up."""
    yaw, pitch = np.deg2rad(yaw_deg), np.deg2rad(pitch_deg)
    centre = radius * np.array([np.sin(yaw) * np.cos(pitch), np.cos(yaw) * np.cos(pitch), np.sin(pitch)])
    forward = -centre / radius
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    return centre, np.stack([right, np.cross(right, forward), forward])


def render_views(
    vertices: np.ndarray,
    faces: np.ndarray,
    colors: np.ndarray | None = None,
    protocol: Protocol = Protocol(),
    supersample: int = 2,
) -> list[np.ndarray]:
    """The protocol's views of a mesh (V, 3) / (F, 3) with vertex colours (V, 3) in [0, 1] (None: grey) ->
    `protocol.views` uint8 images (S, S, 3). An empty mesh renders black."""
    return [render(vertices, faces, colors, yaw, protocol.pitch_deg, protocol, supersample) for yaw in protocol.yaws]


def render(
    vertices: np.ndarray,
    faces: np.ndarray,
    colors: np.ndarray | None,
    yaw_deg: float,
    pitch_deg: float,
    protocol: Protocol = Protocol(),
    supersample: int = 2,
) -> np.ndarray:
    """One view: uint8 (S, S, 3), S = protocol.resolution, rendered at supersample x S and box-filtered down."""
    size = protocol.resolution * supersample
    image = np.zeros((size * size, 3))
    vertices, faces = np.asarray(vertices, np.float64), np.asarray(faces, np.int64).reshape(-1, 3)
    if len(faces):
        colors = np.broadcast_to(DEFAULT_COLOR if colors is None else np.asarray(colors, np.float64), vertices.shape)
        centre, basis = camera_frame(yaw_deg, pitch_deg, protocol.radius)
        view = (vertices - centre) @ basis.T  # (V, 3): right, up, depth
        if np.any(view[:, 2] <= 1e-6):
            raise ValueError("a vertex lies behind the camera: is the mesh inside the unit cube?")
        focal = 0.5 * size / np.tan(np.deg2rad(protocol.fov_deg) / 2)
        screen = np.stack(
            [0.5 * size + focal * view[:, 0] / view[:, 2], 0.5 * size - focal * view[:, 1] / view[:, 2]], 1
        )
        pixel, face, weights = rasterize(screen, view[:, 2], faces, size)
        image[pixel] = np.einsum("nk,nkc->nc", weights, colors[faces[face]]) * head_light(view, faces)[face, None]
    image = image.reshape(protocol.resolution, supersample, protocol.resolution, supersample, 3).mean(axis=(1, 3))
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


def head_light(view: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Per face shade (F,): ambient plus two-sided Lambert from the camera, in camera coordinates (meshes from
    files do not all wind their faces one way)."""
    triangles = view[faces]
    normals = np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    towards = -triangles.mean(axis=1)
    towards /= np.maximum(np.linalg.norm(towards, axis=1, keepdims=True), 1e-12)
    return AMBIENT + (1.0 - AMBIENT) * np.abs(np.einsum("fd,fd->f", normals, towards))


def rasterize(
    screen: np.ndarray, depth: np.ndarray, faces: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest face per covered pixel: flat pixel indices (N,), face indices (N,) and perspective-correct
    barycentric weights (N, 3), z-buffered over chunks of faces of at most CHUNK_CANDIDATES pixel candidates."""
    corners = screen[faces]  # (F, 3, 2)
    low = np.clip(np.ceil(corners.min(axis=1) - 0.5), 0, size).astype(np.int64)
    high = np.clip(np.floor(corners.max(axis=1) - 0.5), -1, size - 1).astype(np.int64)
    counts = np.maximum(high[:, 0] - low[:, 0] + 1, 0) * np.maximum(high[:, 1] - low[:, 1] + 1, 0)
    planes, area = _barycentric_planes(corners)
    counts[area == 0] = 0  # a degenerate face covers nothing
    inverse_depth = 1.0 / depth[faces]  # (F, 3): 1/z interpolates linearly on the screen
    nearest = np.full(size * size, np.inf)
    face_of = np.full(size * size, -1)
    weights_of = np.zeros((size * size, 3))
    chunk_of_face = np.cumsum(counts) // CHUNK_CANDIDATES
    for chunk in np.unique(chunk_of_face[counts > 0]):
        chosen = np.flatnonzero((chunk_of_face == chunk) & (counts > 0))
        pixel, face, bary = _covered(planes, low, high, counts, chosen, size)
        perspective = bary * inverse_depth[face]
        inverse = perspective.sum(axis=1)
        z = 1.0 / inverse
        np.minimum.at(nearest, pixel, z)
        won = z == nearest[pixel]  # among candidates at equal depth the last written wins
        pixel = pixel[won]
        face_of[pixel], weights_of[pixel] = face[won], perspective[won] / inverse[won, None]
    covered = np.flatnonzero(face_of >= 0)
    return covered, face_of[covered], weights_of[covered]


def _barycentric_planes(corners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per face, each barycentric weight as a plane over the screen, w_i(x, y) = planes[f, i] . (x, y, 1) (F, 3, 3),
    and the face's signed doubled area (F,): a candidate pixel then costs one gather and a few multiply-adds."""
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    planes = np.empty((len(corners), 3, 3))
    for i, (p, q) in enumerate(((b, c), (c, a), (a, b))):  # weight i: the edge opposite corner i
        planes[:, i, 0] = p[:, 1] - q[:, 1]
        planes[:, i, 1] = q[:, 0] - p[:, 0]
        planes[:, i, 2] = (q[:, 1] - p[:, 1]) * p[:, 0] - (q[:, 0] - p[:, 0]) * p[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return planes / area[:, None, None], area


def _covered(planes, low, high, counts, chosen, size) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel centres inside the chosen faces' bounding boxes and triangles: pixel (N,), face (N,), screen-space
    barycentric weights (N, 3)."""
    face = np.repeat(chosen, counts[chosen])
    start = np.repeat(np.cumsum(counts[chosen]) - counts[chosen], counts[chosen])
    local = np.arange(len(face)) - start
    width = np.repeat(high[chosen, 0] - low[chosen, 0] + 1, counts[chosen])
    px, py = low[face, 0] + local % width, low[face, 1] + local // width
    plane = planes[face]  # (N, 3, 3)
    bary = plane[:, :, 0] * (px + 0.5)[:, None] + plane[:, :, 1] * (py + 0.5)[:, None] + plane[:, :, 2]
    inside = bary.min(axis=1) >= 0
    return (py * size + px)[inside], face[inside], bary[inside]


def crop_to_object(image: np.ndarray, size: int, margin: float = CROP_MARGIN) -> np.ndarray:
    """TRELLIS's conditioning crop of a render on black: the square of `margin` x the object's larger bounding-box
    side, centred on the box, resized to (size, size, 3). A black image is resized whole."""
    from PIL import Image

    rows, cols = np.nonzero(image.max(axis=2))
    picture = Image.fromarray(image)
    if rows.size:
        centre_y, centre_x = (rows.min() + rows.max() + 1) / 2, (cols.min() + cols.max() + 1) / 2
        half = margin * max(rows.max() + 1 - rows.min(), cols.max() + 1 - cols.min()) / 2
        box = (centre_x - half, centre_y - half, centre_x + half, centre_y + half)
        picture = picture.crop(tuple(int(round(v)) for v in box))  # outside the image comes back black
    return np.asarray(picture.resize((size, size), Image.Resampling.LANCZOS))


def normalized_to_unit_cube(vertices: np.ndarray) -> np.ndarray:
    """Vertices scaled so the bounding box's longest side is 1 and centred on the origin (TRELLIS's frame)."""
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    return (vertices - (low + high) / 2) / max(float((high - low).max()), 1e-12)


def mesh_colors(mesh) -> np.ndarray | None:
    """A trimesh's vertex colours (V, 3) in [0, 1]: its own, or its texture sampled at the vertices; None if it has
    neither (a plain grey mesh)."""
    visual = mesh.visual
    if visual.kind == "texture":
        visual = visual.to_color()
    if visual.kind != "vertex":
        return None
    return np.asarray(visual.vertex_colors, np.float64)[:, :3] / 255.0
