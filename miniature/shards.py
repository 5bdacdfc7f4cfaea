"""The synthetic world as WebDataset tar shards: what `python -m cli synth` and the demo write.

`write_synth(URI, num)` writes `train-*.tar` and `eval-*.tar` (held-out pairs) with, per sample, `<key>.png`,
`<key>.txt`, `<key>.json` (the caption and its attributes) and `<key>.occupancy.npy` (the voxels of TRELLIS's
64^3 grid that the object's surface crosses, see gap3d.data.occupancy), and last `synth.json`: counts, shards,
the held-out pairs and the attribute vocabulary (`attributes`, what the evaluation reads captions with).
Output bytes depend only on the arguments.
"""

import contextlib
import functools
import io
import json
import logging
import multiprocessing
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from gap3d import storage
from gap3d.data.occupancy import encode_occupancy
from miniature.world import ATTRIBUTES, HELD_OUT, SPLITS, render_scene, sample_scene, scene_occupancy

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 3: each sample carries its occupancy grid


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
    stale = sorted(
        p
        for split in SPLITS
        for p in fs.glob(storage.join(root, f"{split}-*.tar"))
        if p.rsplit("/", 1)[-1] not in written
    )
    if stale:
        logger.warning(
            "%s holds %d shard(s) this run did not write (e.g. %s); delete them or use a fresh --out",
            out_uri,
            len(stale),
            stale[0],
        )


def _write_json(out_uri: str, name: str, payload: dict) -> None:
    fs, root = storage.filesystem(out_uri)
    fs.pipe_file(storage.join(root, name), json.dumps(payload, indent=2, sort_keys=True).encode())


def sample_members(index: int, seed: int, image_size: int) -> tuple[str, dict[str, bytes]]:
    """Sample `index`'s split and its shard members: image, caption, attributes and occupancy grid."""
    scene = sample_scene(seed, index)
    attributes = {**scene.attributes, "caption": scene.caption}
    return scene.split, {
        "png": encode_png(render_scene(scene, image_size)),
        "txt": scene.caption.encode(),
        "json": json.dumps(attributes, sort_keys=True).encode(),
        "occupancy.npy": encode_occupancy(scene_occupancy(scene)),
    }


def write_synth(
    out_uri: str, num: int, seed: int = 0, shard_size: int = 1000, image_size: int = 224, workers: int = 1
) -> dict:
    """Render `num` samples into train/eval WebDataset shards under `out_uri`; returns the summary.

    `workers` processes render (the same bytes for any number). The summary (also written last, as `synth.json`)
    lists shards and counts per split, the held-out pairs and the vocabulary.
    """
    if num < 1 or shard_size < 1 or workers < 1:
        raise ValueError(
            f"--num, --shard-size and --workers must be positive, got num={num}, shard_size={shard_size}, "
            f"workers={workers}"
        )
    if image_size < 16:
        raise ValueError(f"--image-size must be at least 16 pixels, got {image_size}")
    writers = {split: ShardWriter(out_uri, split, shard_size) for split in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    start = time.perf_counter()
    make = functools.partial(sample_members, seed=seed, image_size=image_size)
    # Spawned, not forked: the caller may hold threads (a Ray driver does). Results come back in index order.
    spawned = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    with spawned or contextlib.nullcontext():
        samples = spawned.map(make, range(num), chunksize=16) if spawned else map(make, range(num))
        for index, (split, members) in enumerate(samples):
            writers[split].add(f"{index:08d}", members)
            counts[split] += 1
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
        "attributes": {name: list(values) for name, values in ATTRIBUTES.items()},
    }
    _write_json(out_uri, "synth.json", summary)
    logger.info(
        "wrote %s train and %s eval samples to %s in %.1fs",
        counts["train"],
        counts["eval"],
        out_uri,
        time.perf_counter() - start,
    )
    return summary
