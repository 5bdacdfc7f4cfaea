"""Writes shards laid out the way img2dataset's webdataset output is, for tests and benchmarks.

Per shard index i: `{i:05d}.tar` with members `<key>.jpg`, `<key>.txt`, `<key>.json` (the successful
downloads only), `{i:05d}.parquet` with one metadata row per attempted URL (key, caption, url, status,
error_message, width, height; no image), and `{i:05d}_stats.json` with the shard's counts. Keys are
img2dataset's: the shard index in 5 digits followed by the sample index in 4.
"""

import io
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from gap3d import storage


@dataclass(frozen=True)
class Download:
    """One attempted URL: its image bytes when the download succeeded, else None."""

    caption: str
    image: bytes | None  # encoded image; None for a failed download (metadata row only)
    width: int = 0
    height: int = 0


def photo_like_jpeg(rng: np.random.Generator, width: int = 640, height: int = 480) -> bytes:
    """A gradient with a few filled shapes and mild noise, as JPEG: compresses (and decodes) about as a photo does."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    ramp = ((x * np.cos(angle) + y * np.sin(angle)) / np.hypot(width, height)).clip(0, 1)[..., None]
    image = Image.fromarray((rng.uniform(0, 255, 3) * (1 - ramp) + rng.uniform(0, 255, 3) * ramp).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(5):
        left, top = int(rng.integers(0, width - width // 8)), int(rng.integers(0, height - height // 6))
        box_width, box_height = (int(v) for v in rng.integers(width // 16, width * 3 // 8, 2))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((left, top, left + box_width, top + box_height), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def sample_key(shard_index: int, sample_index: int) -> str:
    """img2dataset's key: 5 digits of shard, 4 of sample."""
    return f"{shard_index:05d}{sample_index:04d}"


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _put(uri: str, payload: bytes) -> None:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "wb") as handle:
        handle.write(payload)


def write_img2dataset_shard(directory_uri: str, shard_index: int, downloads: Iterable[Download]) -> dict:
    """Write one shard's tar, metadata Parquet and stats JSON under directory_uri; returns the stats."""
    fs, directory = storage.filesystem(directory_uri)
    fs.makedirs(directory, exist_ok=True)
    stem = storage.join(directory_uri, f"{shard_index:05d}")
    metadata = {"key": [], "caption": [], "url": [], "status": [], "error_message": [], "width": [], "height": []}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for index, download in enumerate(downloads):
            key = sample_key(shard_index, index)
            url = f"https://images.example/{key}.jpg"
            ok = download.image is not None
            row = {
                "key": key,
                "caption": download.caption,
                "url": url,
                "status": "success" if ok else "failed_to_download",
                "error_message": None if ok else "HTTP 404",
                "width": download.width,
                "height": download.height,
            }
            for name, value in row.items():
                metadata[name].append(value)
            if ok:
                _add_member(tar, f"{key}.jpg", download.image)
                _add_member(tar, f"{key}.txt", download.caption.encode())
                _add_member(tar, f"{key}.json", json.dumps(row).encode())
    successes = metadata["status"].count("success")
    stats = {
        "count": len(metadata["key"]),
        "successes": successes,
        "failed_to_download": len(metadata["key"]) - successes,
        "failed_to_resize": 0,
    }
    _put(f"{stem}.tar", buffer.getvalue())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(metadata), sink)
    _put(f"{stem}.parquet", sink.getvalue().to_pybytes())
    _put(f"{stem}_stats.json", json.dumps(stats).encode())
    return stats
