"""The 3D evaluation set (Table 3): objects with one caption each, rendered per the protocol, with DINOv2 targets.

Layout under a directory or URI:
    evalset.json         {"format", "version", "protocol", "dino": {"path", "image_size"}, "assets", "seed",
                         "shards": [names]}; written last, so a set without it is incomplete
    assets-NNNNN.parquet one row per object: index (its place in the set, the seed of its generations), key,
                         caption, renders (PNG per protocol view, yaw 0 first), cond_view (the view TRELLIS-image is
                         conditioned on for the reference arm; -1 when the object came with a conditioning image of
                         its own), dino (float16 bytes of the DINOv2 targets of that view or image, cropped as TRELLIS
                         crops its input), dino_shape [N, D]
The ground truth is rendered by gap3d.render from the object's mesh in TRELLIS's unit cube. The reference arm's
condition is one of those renders, or, where the objects come with images of their own (TRELLIS's conditioning
renders of a dataset, the synthetic world's images), that image: a TRELLIS conditioned on images of one look is
conditioned on that look. `assets_from_files` reads a directory of meshes and a captions CSV (python -m cli
make-evalset).
"""

import csv
import hashlib
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from gap3d import storage
from gap3d.data.images import resize_and_center_crop
from gap3d.render import Protocol, crop_to_object, mesh_colors, normalized_to_unit_cube, render_views

logger = logging.getLogger(__name__)

FORMAT, VERSION = "gap3d-evalset", 1
MANIFEST = "evalset.json"
MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply")
SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("key", pa.string()),
        ("caption", pa.string()),
        ("renders", pa.list_(pa.binary())),
        ("cond_view", pa.int32()),
        ("dino", pa.binary()),
        ("dino_shape", pa.list_(pa.int32())),
    ]
)


@dataclass
class Asset:
    """One object of the set before rendering: its mesh in TRELLIS's frame and its caption."""

    key: str  # identifier (the CSV's sha256 or file path)
    caption: str
    vertices: np.ndarray  # (V, 3) in the unit cube, z up
    faces: np.ndarray  # (F, 3)
    colors: np.ndarray | None  # (V, 3) in [0, 1], None for a mesh without colour
    cond_image: np.ndarray | None = None  # (H, W, 3) uint8 the reference arm is conditioned on; None: a render


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def conditioning_view(protocol: Protocol, seed: int, index: int) -> int:
    """The FD view an asset's reference generation is conditioned on: one drawn per asset from (seed, index)."""
    return int(np.random.default_rng([seed, index]).choice(protocol.fd_views))


def asset_row(
    asset: Asset, index: int, protocol: Protocol, seed: int, dino, supersample: int = 2, crop_cond_image: bool = True
) -> dict:
    """Render `asset` per the protocol and encode its conditioning image with `dino` (a DinoTargetEncoder): a view of
    ours cropped as TRELLIS crops its input, or the asset's own image, cropped so too unless `crop_cond_image` is
    False (then resized as preprocessing resizes training images)."""
    renders = render_views(asset.vertices, asset.faces, asset.colors, protocol, supersample)
    if asset.cond_image is None:
        view = conditioning_view(protocol, seed, index)
        image = crop_to_object(renders[view], dino.image_size)
    else:
        view = -1
        image = (
            crop_to_object(asset.cond_image, dino.image_size)
            if crop_cond_image
            else resize_and_center_crop(Image.fromarray(asset.cond_image), dino.image_size)
        )
    targets = dino.encode(image[None])[0].numpy().astype(np.float16)
    return {
        "index": index,
        "key": asset.key,
        "caption": asset.caption,
        "renders": [png(image) for image in renders],
        "cond_view": view,
        "dino": targets.tobytes(),
        "dino_shape": list(targets.shape),
    }


def write_eval_set(
    out: str,
    assets: Iterator[Asset],
    protocol: Protocol,
    dino,
    dino_path: str,
    seed: int = 0,
    shard_size: int = 64,
    crop_cond_images: bool = True,
) -> dict:
    """Render and encode `assets` into shards under `out`, then evalset.json; returns the manifest. Assets' own
    conditioning images are cropped as TRELLIS crops its input unless `crop_cond_images` is False (images already in
    the look the decoder was trained on)."""
    fs, root = storage.filesystem(out)
    fs.makedirs(root, exist_ok=True)
    shards, rows, count = [], [], 0

    def flush():
        name = f"assets-{len(shards):05d}.parquet"
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), buffer)
        storage.publish_bytes(buffer.getvalue(), storage.join(out, name))
        shards.append(name)
        rows.clear()

    for asset in assets:
        rows.append(asset_row(asset, count, protocol, seed, dino, crop_cond_image=crop_cond_images))
        count += 1
        if len(rows) == shard_size:
            flush()
        if count % 50 == 0:
            logger.info("rendered and encoded %d assets", count)
    if rows:
        flush()
    if count == 0:
        raise ValueError("no asset to write: every row of the captions matched no mesh")
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "protocol": asdict(protocol),
        "dino": {"path": dino_path, "image_size": dino.image_size},
        "assets": count,
        "seed": seed,
        "crop_cond_images": crop_cond_images,
        "shards": shards,
    }
    storage.publish_bytes(json.dumps(manifest, indent=2).encode(), storage.join(out, MANIFEST))
    return manifest


def read_manifest(uri: str) -> dict:
    """evalset.json of an evaluation set, checked."""
    fs, root = storage.filesystem(uri)
    path = storage.join(root, MANIFEST)
    if not fs.isfile(path):
        raise FileNotFoundError(f"{uri} is not a complete evaluation set (no {MANIFEST}); build one with make-evalset")
    manifest = json.loads(fs.cat_file(path))
    if (manifest.get("format"), manifest.get("version")) != (FORMAT, VERSION):
        raise ValueError(
            f"{uri}/{MANIFEST} is {manifest.get('format')} v{manifest.get('version')}; this code reads "
            f"{FORMAT} v{VERSION}"
        )
    return manifest


def shard_uris(uri: str, manifest: dict) -> list[str]:
    return [storage.join(uri, name) for name in manifest["shards"]]


def row_targets(row: dict) -> np.ndarray:
    """The DINOv2 targets (N, D) float32 of an eval-set row."""
    return np.frombuffer(row["dino"], np.float16).reshape(row["dino_shape"]).astype(np.float32)


# --- Meshes and captions on disk -> assets (python -m cli make-evalset) ---


def read_captions(csv_path: str, seed: int = 0) -> list[tuple[str, str]]:
    """(identifier, caption) per row of a captions CSV: TRELLIS-500K's (sha256, file_identifier, captions as a JSON
    list) or any CSV with sha256 or file_identifier and captions or caption. A row with several captions gets one,
    drawn from (seed, row)."""
    fs, path = storage.filesystem(csv_path)
    with fs.open(path, "r") as handle:
        rows = list(csv.DictReader(handle))
    chosen = []
    for number, row in enumerate(rows):
        identifier = row.get("sha256") or row.get("file_identifier")
        text = row.get("captions") or row.get("caption") or ""
        if not identifier:
            raise ValueError(f"{csv_path} row {number + 2} has neither sha256 nor file_identifier")
        try:
            captions = json.loads(text) if text.strip().startswith("[") else [text]
        except json.JSONDecodeError:
            captions = [text]
        captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
        if captions:
            chosen.append((identifier, captions[int(np.random.default_rng([seed, number]).integers(len(captions)))]))
    return chosen


def find_meshes(directory: str) -> dict[str, Path]:
    """Every mesh file under `directory`, by its path relative to it and by the sha256 of its bytes (TRELLIS-500K's
    identifier)."""
    found = {}
    for path in sorted(Path(directory).rglob("*")):
        if path.suffix.lower() in MESH_SUFFIXES and path.is_file():
            found[path.relative_to(directory).as_posix()] = path
            found[hashlib.sha256(path.read_bytes()).hexdigest()] = path
    return found


def load_mesh_file(path: Path, up_axis: str = "y") -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A mesh file -> vertices in TRELLIS's unit cube (z up), faces, vertex colours. `up_axis` "y" (glTF's
    convention, and most OBJ/PLY exporters') turns y-up into z-up."""
    import trimesh

    if up_axis not in ("y", "z"):
        raise ValueError(f"up_axis must be 'y' or 'z', got {up_axis!r}")
    mesh = trimesh.load(str(path), force="mesh", process=False)
    vertices = np.asarray(mesh.vertices, np.float64)
    if up_axis == "y":
        vertices = np.stack([vertices[:, 0], -vertices[:, 2], vertices[:, 1]], axis=1)
    return normalized_to_unit_cube(vertices), np.asarray(mesh.faces, np.int64), mesh_colors(mesh)


def assets_from_files(
    meshes: str,
    captions: str,
    seed: int = 0,
    limit: int | None = None,
    up_axis: str = "y",
    cond_images: str | None = None,
) -> Iterator[Asset]:
    """The captioned meshes of a directory, in the CSV's order; CSV rows without a mesh are skipped with a warning.
    With `cond_images`, each mesh's conditioning image is `<cond_images>/<mesh file stem>.png` (it must exist)."""
    files = find_meshes(meshes)
    missing, yielded = 0, 0
    for identifier, caption in read_captions(captions, seed):
        if limit is not None and yielded >= limit:
            break
        path = files.get(identifier)
        if path is None:
            missing += 1
            continue
        yielded += 1
        image = None if cond_images is None else decode_png((Path(cond_images) / f"{path.stem}.png").read_bytes())
        yield Asset(identifier, caption, *load_mesh_file(path, up_axis), cond_image=image)
    if missing:
        logger.warning("%d captioned rows of %s name no mesh under %s", missing, captions, meshes)
