"""The synthetic world of the tiny preset: one object per image, and a caption that decides the image.

Each sample is one primitive (shape) in one colour, rendered the way TRELLIS's conditioning images look: the
object alone, centred and cropped to fill the frame (1.2x its bounding box), on black. Shape and colour change
most of the pixels; what the caption does not say (the object's turn about its vertical axis, the camera's
elevation, the light) varies within a class, so a prompt-blind guess cannot score. There is no left/right or
size: a 3D asset has neither. Some shape x colour pairs are held out of `train-*.tar` entirely and written to
`eval-*.tar`, so generalisation to unseen combinations can be measured.

`python -m ray_jobs synth --out URI --num N` writes WebDataset tar shards (`<key>.png`, `<key>.txt`,
`<key>.json` with the caption and its attributes, and `<key>.occupancy.npy`: the voxels of TRELLIS's 64^3
grid that the object's surface crosses, see gap3d.data.occupancy). Output bytes depend only on the arguments:
sample i is drawn from its own generator seeded by (seed, i). `object_mesh` gives each sample's mesh in
TRELLIS's unit cube, the frame of its occupancy, so image, caption and 3D shape of a sample agree.
"""

import functools
import io
import json
import logging
import re
import tarfile
import time
from dataclasses import dataclass

import numpy as np

from gap3d import storage
from gap3d.data.occupancy import encode_occupancy, surface_voxels

logger = logging.getLogger(__name__)

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
TEMPLATES = ("a {color} {shape}", "a {shape} in {color}", "one {color} {shape}", "a {color} {shape} on black", "the {shape} is {color}")
# Two disjoint shape->colour permutations: each shape and each colour is held out exactly twice, so every word
# still occurs in train beside four partners. Twelve held-out pairs rather than six: same-pair rows differ only in
# yaw and light, which no caption says, so retrieval among them is a coin toss; more pairs leave more for the
# caption to decide (see gap3d.miniature.caption_ceiling). The thin shapes (pillar, slab) show the least colour.
HELD_OUT = frozenset(
    {("cube", "yellow"), ("sphere", "green"), ("torus", "purple"), ("cone", "blue"), ("pillar", "red"), ("slab", "white"),
     ("cube", "blue"), ("sphere", "white"), ("torus", "red"), ("cone", "yellow"), ("pillar", "green"), ("slab", "purple")}
)
SPLITS = ("train", "eval")
FORMAT_VERSION = 3  # 3: each sample carries its occupancy grid
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
    yaw, elevation, light = float(rng.uniform(-60.0, 60.0)), float(rng.uniform(12.0, 32.0)), float(rng.uniform(-60.0, 20.0))
    caption = TEMPLATES[rng.integers(len(TEMPLATES))].format(color=color, shape=shape)
    return Scene(shape, color, yaw, elevation, light, caption)


_WORDS = {word: (name, word) for name, values in ATTRIBUTES.items() for word in values}


def caption_attributes(caption: str) -> dict[str, str] | None:
    """{"shape", "color"} named by a caption of this world, or None when it names not exactly one of each."""
    found: dict[str, list[str]] = {name: [] for name in ATTRIBUTES}
    for word in re.findall(r"[a-z]+", caption.lower()):
        if word in _WORDS:
            found[_WORDS[word][0]].append(word)
    return {name: words[0] for name, words in found.items()} if all(len(set(words)) == 1 for words in found.values()) else None


def attribute_labels(captions: list[str]) -> dict[str, list[str]] | None:
    """{attribute: value per caption} when every caption names its attributes (this world's captions), else None."""
    parsed = [caption_attributes(caption) for caption in captions]
    if not parsed or any(p is None for p in parsed):
        return None
    return {name: [p[name] for p in parsed] for name in ATTRIBUTES}


@functools.cache
def base_mesh(shape: str) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (V, 3) centred on the origin with largest half-extent 1, z up, and faces (F, 3)."""
    import trimesh

    builders = {
        "cube": lambda: trimesh.creation.box(),
        "sphere": lambda: trimesh.creation.icosphere(subdivisions=3),
        "cone": lambda: trimesh.creation.cone(radius=1.0, height=1.8, sections=40),
        "torus": lambda: trimesh.creation.torus(major_radius=1.0, minor_radius=0.38, major_sections=40, minor_sections=20),
        "pillar": lambda: trimesh.creation.cylinder(radius=0.28, height=2.0, sections=32),
        "slab": lambda: trimesh.creation.box(extents=(2.0, 1.2, 0.35)),
    }
    if shape not in builders:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(builders)}")
    mesh = builders[shape]()
    if shape == "torus":
        # Stand the ring up towards the camera; lying flat it reads as a thin line from a low camera.
        mesh.apply_transform(trimesh.transformations.rotation_matrix(np.deg2rad(70.0), [1.0, 0.0, 0.0]))
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    vertices = (vertices - (low + high) / 2) / ((high - low).max() / 2)
    return vertices, np.asarray(mesh.faces, dtype=np.int64)


def object_mesh(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """The scene's object in TRELLIS's frame: turned by its yaw about z (up), scaled so its longest side is 1 and
    centred in the unit cube [-0.5, 0.5]^3. -> vertices (V, 3), faces (F, 3)."""
    vertices, faces = base_mesh(scene.shape)
    yaw = np.deg2rad(scene.yaw_deg)
    rotation = np.array([[np.cos(yaw), -np.sin(yaw), 0.0], [np.sin(yaw), np.cos(yaw), 0.0], [0.0, 0.0, 1.0]])
    turned = vertices @ rotation.T
    low, high = turned.min(axis=0), turned.max(axis=0)
    return (turned - (low + high) / 2) / (high - low).max(), faces


def scene_occupancy(scene: Scene, resolution: int = 64) -> np.ndarray:
    """bool (R, R, R): the voxels of TRELLIS's grid that the scene's object surface crosses."""
    return surface_voxels(*object_mesh(scene), resolution)


def render_scene(scene: Scene, image_size: int) -> np.ndarray:
    """RGB image (S, S, 3) uint8 of the scene's object, cropped to fill the frame on black."""
    return render_in_scene(*object_mesh(scene), scene, image_size, COLORS[scene.color])


def render_in_scene(vertices: np.ndarray, faces: np.ndarray, scene: Scene, image_size: int, color: tuple[float, float, float]) -> np.ndarray:
    """RGB image (S, S, 3) uint8 of any mesh in TRELLIS's frame under the scene's camera and light, cropped like its render."""
    from gap3d.data.render import Camera, crop_to_object, render_mesh

    azimuth = np.deg2rad(scene.light_azimuth_deg)
    light = np.array([np.sin(azimuth), -np.cos(azimuth), 1.2])
    camera = Camera(elevation_deg=scene.elevation_deg, distance=3.0, fov_deg=30.0)
    full = render_mesh(vertices, faces, color, SUPERSAMPLE * image_size, camera, light / np.linalg.norm(light))
    return crop_to_object(full, image_size, CROP_MARGIN)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 image (H, W, 3)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _tar_member(name: str, payload: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    # Fixed metadata (mtime, owner, mode) keeps the archive bytes reproducible.
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    return info, io.BytesIO(payload)


class ShardWriter:
    """Writes `<split>-NNNNNN.tar` shards of at most `shard_size` samples under a URI.

    Each shard is built in a temporary file and published whole (rename on a local filesystem,
    a single upload on object storage), so a reader never sees a half-written tar.
    """

    def __init__(self, out_uri: str, split: str, shard_size: int):
        self.split = split
        self.shard_size = shard_size
        self.out_uri = out_uri
        self.shards: list[str] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp_path: str | None = None
        self._count = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample: `members` maps an extension ("png", "txt", ...) to its bytes."""
        if self._tar is None:
            self._open()
        for extension, payload in members.items():
            self._tar.addfile(*_tar_member(f"{key}.{extension}", payload))
        self._count += 1
        if self._count == self.shard_size:
            self._publish()

    def close(self) -> None:
        """Publish the last, possibly short, shard."""
        if self._tar is not None:
            self._publish()

    def _name(self) -> str:
        return f"{self.split}-{len(self.shards):06d}.tar"

    def _open(self) -> None:
        self._tmp_path = storage.temp_file_for(storage.join(self.out_uri, self._name()))
        self._tar = tarfile.open(self._tmp_path, mode="w", format=tarfile.USTAR_FORMAT)

    def _publish(self) -> None:
        self._tar.close()
        name = self._name()
        storage.publish_file(self._tmp_path, storage.join(self.out_uri, name))
        self.shards.append(name)
        self._tar, self._tmp_path, self._count = None, None, 0


def _warn_about_stale_shards(out_uri: str, writers: dict[str, ShardWriter]) -> None:
    # A smaller rerun into the same directory leaves the old run's extra shards behind; they would be read as data.
    fs, root = storage.filesystem(out_uri)
    written = {name for writer in writers.values() for name in writer.shards}
    stale = sorted(p for split in SPLITS for p in fs.glob(storage.join(root, f"{split}-*.tar")) if p.rsplit("/", 1)[-1] not in written)
    if stale:
        logger.warning("%s holds %d shard(s) this run did not write (e.g. %s); delete them or use a fresh --out", out_uri, len(stale), stale[0])


def _write_json(out_uri: str, name: str, payload: dict) -> None:
    fs, root = storage.filesystem(out_uri)
    fs.pipe_file(storage.join(root, name), json.dumps(payload, indent=2, sort_keys=True).encode())


def write_synth(out_uri: str, num: int, seed: int = 0, shard_size: int = 1000, image_size: int = 224) -> dict:
    """Render `num` samples into train/eval WebDataset shards under `out_uri`; returns the summary.

    The summary (also written last, as `synth.json`) lists shards and counts per split, the held-out
    pairs and the vocabulary.
    """
    if num < 1 or shard_size < 1:
        raise ValueError(f"--num and --shard-size must be positive, got num={num}, shard_size={shard_size}")
    if image_size < 16:
        raise ValueError(f"--image-size must be at least 16 pixels, got {image_size}")
    writers = {split: ShardWriter(out_uri, split, shard_size) for split in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    start = time.perf_counter()
    for index in range(num):
        scene = sample_scene(seed, index)
        attributes = {**scene.attributes, "caption": scene.caption}
        writers[scene.split].add(
            f"{index:08d}",
            {
                "png": encode_png(render_scene(scene, image_size)),
                "txt": scene.caption.encode(),
                "json": json.dumps(attributes, sort_keys=True).encode(),
                "occupancy.npy": encode_occupancy(scene_occupancy(scene)),
            },
        )
        counts[scene.split] += 1
        if (index + 1) % 500 == 0 or index + 1 == num:
            elapsed = time.perf_counter() - start
            logger.info("rendered %d/%d samples (%.0f images/s)", index + 1, num, (index + 1) / elapsed)
    for writer in writers.values():
        writer.close()
    _warn_about_stale_shards(out_uri, writers)
    summary = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "num": num,
        "image_size": image_size,
        "shard_size": shard_size,
        "counts": counts,
        "shards": {split: writer.shards for split, writer in writers.items()},
        "held_out": sorted([shape, color] for shape, color in HELD_OUT),
        "shapes": list(SHAPES),
        "colors": list(COLORS),
    }
    _write_json(out_uri, "synth.json", summary)
    logger.info("wrote %s train and %s eval samples to %s in %.1fs", counts["train"], counts["eval"], out_uri, time.perf_counter() - start)
    return summary
