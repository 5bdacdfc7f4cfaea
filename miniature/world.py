"""The synthetic world of the tiny preset: one object per image, and a caption that decides the image.

Each sample is one primitive (shape) in one colour, rendered the way TRELLIS's conditioning images look: the
object alone, centred and cropped to fill the frame (1.2x its bounding box), on black. Shape and colour change
most of the pixels; what the caption does not say (the object's turn about its vertical axis, the camera's
elevation, the light) varies within a class, so a prompt-blind guess cannot score. There is no left/right or
size: a 3D asset has neither. Some shape x colour pairs are held out of training entirely (the eval split), so
generalisation to unseen combinations can be measured. Sample i is drawn from its own generator seeded by
(seed, i); `object_mesh` gives its mesh in TRELLIS's unit cube, the frame of its occupancy, so image, caption and
3D shape of a sample agree. miniature.shards writes the world as WebDataset shards.
"""

import functools
from dataclasses import dataclass

import numpy as np

from gap3d.data.occupancy import surface_voxels

# Chosen for silhouettes that differ once cropped to fill the frame: a square, a disk, a triangle, a ring, a
# vertical bar and a horizontal bar (a cylinder or a capsule would be another round-topped upright blob).
SHAPES = ("cube", "sphere", "cone", "torus", "pillar", "slab")
COLORS = {  # RGB in [0, 1], far apart in chromaticity so shading never changes the colour name
    "red": (0.86, 0.12, 0.12),
    "yellow": (0.92, 0.85, 0.12),
    "green": (0.15, 0.7, 0.2),
    "blue": (0.15, 0.3, 0.92),
    "purple": (0.6, 0.2, 0.82),
    "white": (0.92, 0.92, 0.92),
}
ATTRIBUTES = {"shape": SHAPES, "color": tuple(COLORS)}  # what a caption says, and its possible values
TEMPLATES = (
    "a {color} {shape}",
    "a {shape} in {color}",
    "one {color} {shape}",
    "a {color} {shape} on black",
    "the {shape} is {color}",
)
# Two disjoint shape->colour permutations: each shape and each colour is held out exactly twice, so every word
# still occurs in train beside four partners. Twelve held-out pairs rather than six: same-pair rows differ only in
# yaw and light, which no caption says, so retrieval among them is a coin toss; more pairs leave more for the
# caption to decide (see miniature.experiment.caption_ceiling). The thin shapes (pillar, slab) show the least colour.
HELD_OUT = frozenset(
    {
        ("cube", "yellow"),
        ("sphere", "green"),
        ("torus", "purple"),
        ("cone", "blue"),
        ("pillar", "red"),
        ("slab", "white"),
        ("cube", "blue"),
        ("sphere", "white"),
        ("torus", "red"),
        ("cone", "yellow"),
        ("pillar", "green"),
        ("slab", "purple"),
    }
)
SPLITS = ("train", "eval")
CROP_MARGIN = 1.2  # TRELLIS crops its conditioning images to 1.2x the object's bounding box
SUPERSAMPLE = 2  # render at twice the output size, then crop and downsample (anti-aliased edges)


@dataclass(frozen=True)
class Scene:
    """Everything that determines one sample's image, caption and 3D shape."""

    shape: str
    color: str
    yaw_deg: float  # the object's turn about its vertical axis (changes its silhouette and shading)
    elevation_deg: float  # how far above the horizon the camera looks down from
    light_azimuth_deg: float  # direction the light comes from, about the vertical axis
    caption: str

    @property
    def split(self) -> str:
        return "eval" if (self.shape, self.color) in HELD_OUT else "train"

    @property
    def attributes(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color}


def sample_scene(seed: int, index: int) -> Scene:
    """The scene of sample `index`, drawn from a generator seeded by (seed, index) alone."""
    rng = np.random.default_rng([seed, index])
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    yaw, elevation, light = (
        float(rng.uniform(-60.0, 60.0)),
        float(rng.uniform(12.0, 32.0)),
        float(rng.uniform(-60.0, 20.0)),
    )
    caption = TEMPLATES[rng.integers(len(TEMPLATES))].format(color=color, shape=shape)
    return Scene(shape, color, yaw, elevation, light, caption)


@functools.cache
def primitive_mesh(shape: str):
    """The trimesh primitive `shape` is made of, in the frame trimesh builds it in (the torus stood up)."""
    import trimesh

    builders = {
        "cube": lambda: trimesh.creation.box(),
        "sphere": lambda: trimesh.creation.icosphere(subdivisions=3),
        "cone": lambda: trimesh.creation.cone(radius=1.0, height=1.8, sections=40),
        "torus": lambda: trimesh.creation.torus(
            major_radius=1.0, minor_radius=0.38, major_sections=40, minor_sections=20
        ),
        "pillar": lambda: trimesh.creation.cylinder(radius=0.28, height=2.0, sections=32),
        "slab": lambda: trimesh.creation.box(extents=(2.0, 1.2, 0.35)),
    }
    if shape not in builders:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(builders)}")
    mesh = builders[shape]()
    if shape == "torus":
        # Stand the ring up towards the camera; lying flat it reads as a thin line from a low camera.
        mesh.apply_transform(trimesh.transformations.rotation_matrix(np.deg2rad(70.0), [1.0, 0.0, 0.0]))
    return mesh


@functools.cache
def base_mesh(shape: str) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (V, 3) centred on the origin with largest half-extent 1, z up, and faces (F, 3)."""
    mesh = primitive_mesh(shape)
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    vertices = (vertices - (low + high) / 2) / ((high - low).max() / 2)
    return vertices, np.asarray(mesh.faces, dtype=np.int64)


def object_frame(scene: Scene) -> tuple[np.ndarray, np.ndarray, float]:
    """(turn (3, 3), centre (3,), scale) that put the base mesh into TRELLIS's frame: p = (base @ turn.T - centre) /
    scale."""
    yaw = np.deg2rad(scene.yaw_deg)
    turn = np.array([[np.cos(yaw), -np.sin(yaw), 0.0], [np.sin(yaw), np.cos(yaw), 0.0], [0.0, 0.0, 1.0]])
    turned = base_mesh(scene.shape)[0] @ turn.T
    low, high = turned.min(axis=0), turned.max(axis=0)
    return turn, (low + high) / 2, float((high - low).max())


def object_mesh(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """The scene's object in TRELLIS's frame: turned by its yaw about z (up), scaled so its longest side is 1 and
    centred in the unit cube [-0.5, 0.5]^3. -> vertices (V, 3), faces (F, 3)."""
    vertices, faces = base_mesh(scene.shape)
    turn, centre, scale = object_frame(scene)
    return (vertices @ turn.T - centre) / scale, faces


def scene_occupancy(scene: Scene, resolution: int = 64) -> np.ndarray:
    """bool (R, R, R): the voxels of TRELLIS's grid that the scene's object surface crosses."""
    return surface_voxels(*object_mesh(scene), resolution)


def render_scene(scene: Scene, image_size: int) -> np.ndarray:
    """RGB image (S, S, 3) uint8 of the scene's object, cropped to fill the frame on black."""
    return render_in_scene(*object_mesh(scene), scene, image_size, COLORS[scene.color])


def render_in_scene(
    vertices: np.ndarray,
    faces: np.ndarray,
    scene: Scene,
    image_size: int,
    color: tuple[float, float, float] | np.ndarray,
) -> np.ndarray:
    """RGB image (S, S, 3) uint8 of any mesh in TRELLIS's frame under the scene's camera and light, cropped like its
    render."""
    from miniature.render import Camera, crop_to_object, render_mesh

    azimuth = np.deg2rad(scene.light_azimuth_deg)
    light = np.array([np.sin(azimuth), -np.cos(azimuth), 1.2])
    camera = Camera(elevation_deg=scene.elevation_deg, distance=3.0, fov_deg=30.0)
    full = render_mesh(vertices, faces, color, SUPERSAMPLE * image_size, camera, light / np.linalg.norm(light))
    return crop_to_object(full, image_size, CROP_MARGIN)
