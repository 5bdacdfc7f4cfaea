"""Synthetic image-caption pairs: rendered 3D primitives with captions from a small grammar.

`python -m ray_jobs synth --out URI --num N` writes WebDataset tar shards (`<key>.png`, `<key>.txt`, and
`<key>.json` with the caption and its attributes). Some shape x colour pairs are held out of
`train-*.tar` entirely and written to `eval-*.tar`, so generalisation to unseen combinations can be
measured. Output bytes depend only on the arguments: sample i is drawn from its own generator
seeded by (seed, i).
"""

import functools
import io
import json
import logging
import tarfile
import time
from dataclasses import asdict, dataclass

import numpy as np

from gap3d import storage

logger = logging.getLogger(__name__)

SHAPES = ("cube", "sphere", "cylinder", "cone", "torus", "capsule")
COLORS = {  # RGB in [0, 1], far apart in chromaticity so shading never changes the colour name
    "red": (0.86, 0.12, 0.12),
    "orange": (0.95, 0.5, 0.08),
    "yellow": (0.92, 0.85, 0.12),
    "green": (0.15, 0.7, 0.2),
    "blue": (0.15, 0.3, 0.92),
    "purple": (0.6, 0.2, 0.82),
    "white": (0.92, 0.92, 0.92),
}
SIZES = {"small": 0.45, "medium": 0.65, "large": 0.85}  # half-extent of the object's largest axis
POSITIONS = {"left": -1.15, "center": 0.0, "right": 1.15}  # x of the object's centre
POSITION_PHRASES = {"left": ("on the left",), "center": ("in the center", "in the middle"), "right": ("on the right",)}
TEMPLATES = ("a {size} {color} {shape} {where}", "there is a {size} {color} {shape} {where}", "{where}, a {size} {color} {shape}")
# Each shape and each chromatic colour is held out exactly once, so every word still occurs in train.
HELD_OUT = frozenset(
    {("cube", "red"), ("sphere", "blue"), ("cylinder", "yellow"), ("cone", "green"), ("torus", "orange"), ("capsule", "purple")}
)
SPLITS = ("train", "eval")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Scene:
    """Everything that determines one sample's image and caption."""

    shape: str
    color: str
    size: str
    position: str
    yaw_deg: float  # rotation about the vertical axis
    offset: tuple[float, float, float]  # jitter added to the nominal position
    caption: str

    @property
    def split(self) -> str:
        return "eval" if (self.shape, self.color) in HELD_OUT else "train"


def sample_scene(seed: int, index: int) -> Scene:
    """The scene of sample `index`, drawn from a generator seeded by (seed, index) alone."""
    rng = np.random.default_rng([seed, index])
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    yaw = float(rng.uniform(-45.0, 45.0))
    offset = tuple(float(v) for v in rng.uniform([-0.1, -0.25, -0.15], [0.1, 0.25, 0.15]))
    phrases = POSITION_PHRASES[position]
    where = phrases[rng.integers(len(phrases))]
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    caption = template.format(size=size, color=color, shape=shape, where=where)
    return Scene(shape, color, size, position, yaw, offset, caption)


@functools.cache
def base_mesh(shape: str) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (V, 3) centred on the origin with largest half-extent 1, and faces (F, 3)."""
    import trimesh

    builders = {
        "cube": lambda: trimesh.creation.box(),
        "sphere": lambda: trimesh.creation.icosphere(subdivisions=3),
        "cylinder": lambda: trimesh.creation.cylinder(radius=0.8, height=1.6, sections=40),
        "cone": lambda: trimesh.creation.cone(radius=1.0, height=1.8, sections=40),
        "torus": lambda: trimesh.creation.torus(major_radius=1.0, minor_radius=0.38, major_sections=40, minor_sections=20),
        "capsule": lambda: trimesh.creation.capsule(height=1.2, radius=0.5, count=[20, 20]),
    }
    if shape not in builders:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(builders)}")
    mesh = builders[shape]()
    if shape == "torus":
        # Stand the ring up towards the camera; lying flat it reads as a thin line at 20 degrees.
        mesh.apply_transform(trimesh.transformations.rotation_matrix(np.deg2rad(70.0), [1.0, 0.0, 0.0]))
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    vertices = (vertices - (low + high) / 2) / ((high - low).max() / 2)
    return vertices, np.asarray(mesh.faces, dtype=np.int64)


def render_scene(scene: Scene, image_size: int) -> np.ndarray:
    """RGB image (S, S, 3) uint8 of a scene on a black background."""
    from gap3d.data.render import render_mesh

    vertices, faces = base_mesh(scene.shape)
    yaw = np.deg2rad(scene.yaw_deg)
    rotation = np.array([[np.cos(yaw), -np.sin(yaw), 0.0], [np.sin(yaw), np.cos(yaw), 0.0], [0.0, 0.0, 1.0]])
    centre = np.array([POSITIONS[scene.position], 0.0, 0.0]) + np.asarray(scene.offset)
    placed = vertices @ rotation.T * SIZES[scene.size] + centre
    return render_mesh(placed, faces, COLORS[scene.color], image_size)


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
        attributes = {k: v for k, v in asdict(scene).items() if k in ("shape", "color", "size", "position", "caption")}
        writers[scene.split].add(
            f"{index:08d}",
            {
                "png": encode_png(render_scene(scene, image_size)),
                "txt": scene.caption.encode(),
                "json": json.dumps(attributes, sort_keys=True).encode(),
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
        "sizes": list(SIZES),
        "positions": list(POSITIONS),
    }
    _write_json(out_uri, "synth.json", summary)
    logger.info("wrote %s train and %s eval samples to %s in %.1fs", counts["train"], counts["eval"], out_uri, time.perf_counter() - start)
    return summary
