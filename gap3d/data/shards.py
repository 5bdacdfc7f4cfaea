"""Raw image-caption shards: listing, record iteration, decoding with skip reasons, DINOv2 image prep.

Formats (DESIGN.md, "Data"): WebDataset tar (`<key>.jpg|jpeg|png|webp` + `<key>.txt` or `<key>.json`
with a "caption" field) and Parquet (`image` encoded bytes + `caption`). Bad records never raise:
they come back as `Skipped` with one reason from `SKIP_REASONS`, so a job can count them.
"""

import gzip
import io
import json
import logging
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image

from gap3d import storage

logger = logging.getLogger(__name__)

SKIP_REASONS = ("missing_image", "missing_caption", "empty_caption", "undecodable_image", "image_too_small", "corrupt_member")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHARD_FORMATS = {".tar": "webdataset", ".parquet": "parquet"}
_PARQUET_BATCH_ROWS = 256


@dataclass
class DataConfig:
    min_image_side: int = 128  # smaller images are skipped as image_too_small

    def __post_init__(self):
        if self.min_image_side < 1:
            raise ValueError(f"data.min_image_side must be >= 1, got {self.min_image_side}")


@dataclass(frozen=True)
class Shard:
    """One input shard file."""

    uri: str  # full URI (local paths stay plain paths)
    shard_id: str  # path relative to the listed root, "/" -> "__": stable across reruns and storage schemes
    format: str  # "webdataset" or "parquet"


@dataclass(frozen=True)
class RawRecord:
    """One undecoded sample as stored in a shard."""

    key: str
    image: bytes | None  # encoded image, None when the sample has no image
    caption: str | None  # None when the sample has no caption member or field
    skip_reason: str | None = None  # "corrupt_member" when the shard broke while reading this sample


@dataclass(frozen=True)
class Sample:
    """A decoded, valid sample."""

    key: str
    image: Image.Image  # RGB; alpha already composited onto black
    caption: str  # stripped of surrounding whitespace


@dataclass(frozen=True)
class Skipped:
    """A bad sample and why it was dropped."""

    key: str
    reason: str  # one of SKIP_REASONS


def _shard_format(path: str) -> str | None:
    name = posixpath.basename(path)
    if name.startswith((".", "_")):  # partial uploads, _SUCCESS markers and the like
        return None
    return SHARD_FORMATS.get(posixpath.splitext(name)[1].lower())


def list_shards(uri: str) -> list[Shard]:
    """Shards under a directory URI (recursively), matching a glob URI, or the single shard file `uri`, sorted."""
    fs, path = storage.filesystem(uri)
    path = path.rstrip("/")
    if storage.has_glob(path):
        root, paths = storage.glob_root(path), fs.glob(path)
    elif fs.isdir(path):
        root, paths = path, fs.find(path)
    elif fs.isfile(path):
        root, paths = posixpath.dirname(path), [path]
    else:
        raise FileNotFoundError(f"no shards at {uri}: give a directory, a glob like .../train-*.tar, or a .tar/.parquet file")
    shards = []
    for found in sorted(paths):
        shard_format = _shard_format(found)
        if shard_format is None:
            continue
        relative = posixpath.relpath(found, root) if root else found
        shards.append(Shard(uri=storage.with_scheme(uri, found), shard_id=relative.replace("/", "__"), format=shard_format))
    if not shards:
        logger.warning("no .tar or .parquet shards found at %s", uri)
    return shards


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the file name."""
    directory, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(directory, stem), extension.lower()


def _caption_from_members(members: dict[str, bytes]) -> str | None:
    if "txt" in members:
        return members["txt"].decode("utf-8", errors="replace")
    if "json" in members:
        try:
            caption = json.loads(members["json"]).get("caption")
        except (ValueError, AttributeError):
            return None
        return caption if isinstance(caption, str) else None
    return None


def _record_from_members(key: str, members: dict[str, bytes]) -> RawRecord:
    image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
    return RawRecord(key=key, image=image, caption=_caption_from_members(members))


class _StrictTarInfo(tarfile.TarInfo):
    """Treats a cut or garbled header after the first as corruption.

    tarfile silently ends iteration there, which would pass a truncated archive off as a short one.
    """

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as error:
            if tar.offset == 0:
                raise
            raise tarfile.ReadError(f"broken tar header at byte {tar.offset}: {error}") from None


def iter_tar_records(fileobj: BinaryIO) -> Iterator[RawRecord]:
    """Records of a WebDataset tar stream, in order; a broken archive ends with one `corrupt_member` record.

    Members of a sample must be adjacent, as WebDataset writers produce them, so the sample in
    progress when the archive breaks (truncated data, cut or garbled header) is the corrupt one; it
    carries that sample's key, or "" when the first header is already broken. Reads sequentially
    (streaming mode), so it works on non-seekable object-storage streams.
    """
    key, members = None, {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_StrictTarInfo) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, extension = split_member_name(member.name)
                if member_key != key:
                    if key is not None:
                        yield _record_from_members(key, members)
                    key, members = member_key, {}
                payload = tar.extractfile(member).read()
                members.setdefault(extension, payload)
    # Only format errors count as corrupt: an I/O error of the storage itself must still raise.
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        logger.warning("corrupt tar member after key %r: %s", key, error)
        yield RawRecord(key=key or "", image=None, caption=None, skip_reason="corrupt_member")
        return
    if key is not None:
        yield _record_from_members(key, members)


def _image_bytes(value) -> bytes | None:
    # Hugging Face `datasets` stores images as a struct {"bytes": ..., "path": ...}.
    if isinstance(value, dict):
        value = value.get("bytes")
    return value if isinstance(value, bytes) else None


def iter_parquet_records(source: str | BinaryIO) -> Iterator[RawRecord]:
    """Records of a Parquet file with columns `image` (bytes) and `caption` (and optionally `key`).

    Keys come from the `key` column when there is one, else the row number ("%08d"). A file that
    cannot be parsed ends the iteration with one `corrupt_member` record.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source)
    except pa.ArrowInvalid as error:
        logger.warning("unreadable Parquet shard %s: %s", source, error)
        yield RawRecord(key="", image=None, caption=None, skip_reason="corrupt_member")
        return
    names = parquet.schema_arrow.names
    missing = {"image", "caption"} - set(names)
    if missing:
        raise ValueError(f"Parquet shard {source} lacks column(s) {sorted(missing)}; it has {names}")
    columns = ["image", "caption"] + (["key"] if "key" in names else [])
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            data = batch.to_pydict()
            keys = data.get("key") or [f"{row + i:08d}" for i in range(batch.num_rows)]
            for key, image, caption in zip(keys, data["image"], data["caption"]):
                yield RawRecord(key=str(key), image=_image_bytes(image), caption=caption if isinstance(caption, str) else None)
            row += batch.num_rows
    except pa.ArrowInvalid as error:
        logger.warning("corrupt Parquet shard %s after row %d: %s", source, row, error)
        yield RawRecord(key=f"{row:08d}", image=None, caption=None, skip_reason="corrupt_member")


def iter_shard_records(shard: Shard) -> Iterator[RawRecord]:
    """Records of one listed shard, opened through fsspec."""
    fs, path = storage.filesystem(shard.uri)
    with fs.open(path, "rb") as handle:
        if shard.format == "webdataset":
            yield from iter_tar_records(handle)
        else:
            yield from iter_parquet_records(handle)


def composite_on_black(image: Image.Image) -> Image.Image:
    """RGB copy of `image`; with alpha, colours are premultiplied (composited onto black), as TRELLIS expects."""
    if "A" not in image.getbands() and "transparency" not in image.info:
        return image.convert("RGB")
    rgba = np.asarray(image.convert("RGBA"), dtype=np.uint16)  # (H, W, 4)
    rgb = (rgba[..., :3] * rgba[..., 3:] + 127) // 255  # rounded c * a / 255
    return Image.fromarray(rgb.astype(np.uint8), mode="RGB")


def decode_record(record: RawRecord, min_side: int = 64) -> Sample | Skipped:
    """Decode and validate one record; never raises for bad data."""
    if record.skip_reason is not None:
        return Skipped(record.key, record.skip_reason)
    if record.image is None:
        return Skipped(record.key, "missing_image")
    if record.caption is None:
        return Skipped(record.key, "missing_caption")
    caption = record.caption.strip()
    if not caption:
        return Skipped(record.key, "empty_caption")
    try:
        with Image.open(io.BytesIO(record.image)) as opened:
            opened.load()
            image = composite_on_black(opened)
    except Exception:  # PIL raises many types (OSError, SyntaxError, zlib.error, ...) on bad bytes
        return Skipped(record.key, "undecodable_image")
    if min(image.size) < min_side:
        return Skipped(record.key, "image_too_small")
    return Sample(record.key, image, caption)


def resize_and_center_crop(image: Image.Image, size: int = 518) -> np.ndarray:
    """Resize the short side to `size` (bicubic), center-crop size x size: uint8 (size, size, 3).

    Sizes and offsets follow torchvision's Resize(size) + CenterCrop(size): the long side is
    truncated, the crop offset rounded.
    """
    width, height = image.size
    if min(width, height) != size:
        if width <= height:
            width, height = size, int(size * height / width)
        else:
            width, height = int(size * width / height), size
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return np.asarray(image.convert("RGB").crop((left, top, left + size, top + size)))
