"""Raw image-caption shards: listing, record iteration, decoding with skip reasons.

Formats: WebDataset tar, also gzipped (`<key>.jpg|jpeg|png|webp` + `<key>.txt` or
`<key>.json` with a "caption" field), and Parquet (`image` encoded bytes, a Hugging Face {bytes, path}
struct or a base64 string, + `caption`). img2dataset's output reads as a directory: beside each
`00000.tar` its `00000.parquet` holds metadata, not images, and supplies captions the tar lacks;
`00000_stats.json` is ignored. Bad records never raise: they come back as `Skipped` with one reason
from `SKIP_REASONS`, so a job can count them.
"""

import base64
import binascii
import gzip
import json
import logging
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from PIL import Image

from gap3d import storage
from gap3d.data.images import decode_image

logger = logging.getLogger(__name__)

SKIP_REASONS = (
    "missing_image",
    "missing_caption",
    "empty_caption",
    "undecodable_image",
    "image_too_small",
    "corrupt_member",
    "duplicate_key",
    "unreadable_shard",
)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHARD_SUFFIXES = {".tar.gz": "webdataset", ".tgz": "webdataset", ".tar": "webdataset", ".parquet": "parquet"}
_PARQUET_BATCH_ROWS = 256


@dataclass(frozen=True)
class Shard:
    """One input shard file, and the identity a finished encoding of it is keyed on."""

    uri: str  # full URI (local paths stay plain paths)
    shard_id: str  # path relative to the listed root, "/" -> "__": stable across reruns and storage schemes
    format: str  # "webdataset" or "parquet"
    size: int | None = None  # bytes, from the listing
    version: str | None = None  # ETag on object storage, mtime locally: changes when the file is replaced
    metadata_uri: str | None = None  # img2dataset's metadata Parquet beside a tar, if any

    @property
    def stem(self) -> str:
        """shard_id without its shard suffix ("a__00000.tar" -> "a__00000")."""
        return self.shard_id[: -len(_shard_suffix(self.shard_id))]

    def identity(self) -> dict:
        """What says the input is unchanged since it was encoded."""
        return {"size": self.size, "version": self.version}


@dataclass(frozen=True)
class RawRecord:
    """One undecoded sample as stored in a shard."""

    key: str
    image: bytes | None  # encoded image, None when the sample has no image
    caption: str | None  # None when the sample has no caption member or field
    skip_reason: str | None = None  # set when the record is bad before decoding (corrupt_member, duplicate_key, ...)


@dataclass(frozen=True)
class Sample:
    """A decoded, valid sample."""

    key: str
    image: Image.Image  # RGB; orientation applied, alpha composited onto black
    caption: str  # stripped of surrounding whitespace


@dataclass(frozen=True)
class Skipped:
    """A bad sample and why it was dropped."""

    key: str
    reason: str  # one of SKIP_REASONS


def _shard_suffix(name: str) -> str:
    lower = name.lower()
    return next((suffix for suffix in SHARD_SUFFIXES if lower.endswith(suffix)), "")


def _shard_format(path: str) -> str | None:
    name = posixpath.basename(path)
    if name.startswith((".", "_")):  # partial uploads, _SUCCESS markers and the like
        return None
    return SHARD_SUFFIXES.get(_shard_suffix(name))


def _listing(fs, path: str) -> tuple[str, dict[str, dict]]:
    """(root the shard ids are relative to, {path: info}) for a directory, a glob or one file."""
    if storage.has_glob(path):
        return storage.glob_root(path), fs.glob(path, detail=True)
    if fs.isdir(path):
        return path, fs.find(path, detail=True)
    if fs.isfile(path):
        return posixpath.dirname(path), {path: fs.info(path)}
    raise FileNotFoundError(
        f"no shards at {path}: give a directory, a glob like .../train-*.tar, or a .tar/.tar.gz/.parquet file"
    )


def _metadata_sidecars(fs, tars: list[str], found: dict[str, dict]) -> dict[str, str]:
    """Tar path -> the metadata Parquet of the same stem beside it (img2dataset's layout), when there is one."""
    directories = {posixpath.dirname(path) for path in tars}
    known = set(found)
    for directory in directories:  # a glob like *.tar lists no Parquet: look beside the tars once per directory
        if not any(posixpath.dirname(path) == directory and path.endswith(".parquet") for path in known):
            known.update(fs.ls(directory, detail=False))
    sidecars = {}
    for path in tars:
        candidate = path[: -len(_shard_suffix(path))] + ".parquet"
        if candidate in known:
            sidecars[path] = candidate
    return sidecars


def _inside(path: str, directory: str | None) -> bool:
    return directory is not None and (path == directory or path.startswith(directory.rstrip("/") + "/"))


def list_shards(uri: str, exclude: str | None = None) -> list[Shard]:
    """Shards under a directory URI (recursively), matching a glob URI, or the single file `uri`, sorted.

    Files under `exclude` (the job's output directory) are left out. A Parquet file beside a tar of the same
    stem is that tar's metadata, not a shard.
    """
    fs, path = storage.filesystem(uri)
    root, found = _listing(fs, path.rstrip("/"))
    excluded = storage.filesystem(exclude)[1].rstrip("/") if exclude and storage.same_filesystem(uri, exclude) else None
    candidates = {
        p: info
        for p, info in found.items()
        if _shard_format(p) and info.get("type", "file") == "file" and not _inside(p, excluded)
    }
    tars = [p for p in candidates if _shard_format(p) == "webdataset"]
    sidecars = _metadata_sidecars(fs, tars, found)
    shards = []
    for found_path in sorted(set(candidates) - set(sidecars.values())):
        info = candidates[found_path]
        relative = posixpath.relpath(found_path, root) if root else found_path
        version = info.get("ETag") or info.get("mtime") or info.get("LastModified")
        metadata = sidecars.get(found_path)
        shards.append(
            Shard(
                uri=storage.with_scheme(uri, found_path),
                shard_id=relative.replace("/", "__"),
                format=_shard_format(found_path),
                size=info.get("size"),
                version=None if version is None else str(version),
                metadata_uri=None if metadata is None else storage.with_scheme(uri, metadata),
            )
        )
    if not shards:
        logger.warning("no .tar, .tar.gz, .tgz or .parquet shards found at %s", uri)
    return shards


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the file name."""
    directory, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(directory, stem), extension.lower()


def _caption_from_members(members: dict[str, bytes], fallback: str | None = None) -> str | None:
    """The first non-blank of: .txt, the .json's "caption", `fallback`; "" when only blank ones exist, None when
    none."""
    candidates = []
    if "txt" in members:
        candidates.append(members["txt"].decode("utf-8", errors="replace"))
    if "json" in members:
        try:
            caption = json.loads(members["json"]).get("caption")
        except (ValueError, AttributeError):
            caption = None
        if isinstance(caption, str):
            candidates.append(caption)
    if fallback is not None:
        candidates.append(fallback)
    return next((caption for caption in candidates if caption.strip()), "" if candidates else None)


def _has_image(members: dict[str, bytes]) -> bool:
    return any(ext in members for ext in IMAGE_EXTENSIONS)


def _record_from_members(key: str, members: dict[str, bytes], fallback: str | None = None) -> RawRecord:
    image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
    return RawRecord(key=key, image=image, caption=_caption_from_members(members, fallback))


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


class _CorruptTar(Exception):
    """The archive broke while the member group of `key` was being read."""

    def __init__(self, key: str | None, error: Exception):
        super().__init__(f"after key {key!r}: {error}")
        self.key = key


def _member_groups(fileobj: BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: payload}) per run of adjacent members sharing a key; a broken archive raises _CorruptTar."""
    key, members = None, {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_StrictTarInfo) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, extension = split_member_name(member.name)
                if member_key != key:
                    if key is not None:
                        yield key, members
                    key, members = member_key, {}
                payload = tar.extractfile(member).read()
                members.setdefault(extension, payload)
    # Only format errors count as corrupt: an I/O error of the storage itself must still raise.
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise _CorruptTar(key, error) from error
    if key is not None:
        yield key, members


class _TarSamples:
    """Groups members into samples by key, also when a sample's members are not adjacent.

    A sample is emitted as soon as it has an image and a non-blank caption; incomplete ones wait (as
    encoded bytes) for more members and are emitted at the end of the archive. A second image under an
    emitted key is a duplicate_key record; other late members of an emitted sample are ignored.
    """

    def __init__(self, captions: dict[str, str]):
        self.captions = captions  # key -> caption from img2dataset's metadata Parquet
        self.pending: dict[str, dict[str, bytes]] = {}
        self.emitted: set[str] = set()

    def add(self, key: str, members: dict[str, bytes]) -> Iterator[RawRecord]:
        if key in self.emitted or (key in self.pending and _has_image(self.pending[key]) and _has_image(members)):
            if _has_image(members):
                yield RawRecord(key=key, image=None, caption=None, skip_reason="duplicate_key")
            return
        merged = self.pending.pop(key, {})
        for extension, payload in members.items():
            merged.setdefault(extension, payload)
        record = _record_from_members(key, merged, self.captions.get(key))
        if record.image is not None and record.caption:
            self.emitted.add(key)
            yield record
        else:
            self.pending[key] = merged

    def flush(self) -> Iterator[RawRecord]:
        for key, members in self.pending.items():
            self.emitted.add(key)
            yield _record_from_members(key, members, self.captions.get(key))
        self.pending = {}


def iter_tar_records(
    fileobj: BinaryIO, captions: dict[str, str] | None = None, where: str = "tar"
) -> Iterator[RawRecord]:
    """Records of a WebDataset tar stream (plain or gzipped); a broken archive ends with one `corrupt_member` record.

    The corrupt record carries the key of the member group being read when the archive broke (truncated data,
    cut or garbled header), or "" when the first header is already broken. Reads sequentially (streaming mode),
    so it works on non-seekable object-storage streams. `captions` (key -> caption) fill in samples without one.
    """
    samples = _TarSamples(captions or {})
    try:
        for key, members in _member_groups(fileobj):
            yield from samples.add(key, members)
    except _CorruptTar as error:
        logger.warning("%s: corrupt tar member %s", where, error)
        yield from samples.flush()
        yield RawRecord(key=error.key or "", image=None, caption=None, skip_reason="corrupt_member")
        return
    yield from samples.flush()


def _image_bytes(value) -> bytes | None:
    """Encoded image bytes of a Parquet cell: bytes, a Hugging Face {"bytes", "path"} struct, or a base64 string."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") else value  # data:image/png;base64,...
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return text.encode("utf-8", errors="replace")  # not base64: undecodable, not missing
    return value if isinstance(value, bytes) else None


class UnreadableShard(ValueError):
    """A listed file that is not a shard of a known kind (e.g. a Parquet without an `image` column)."""


def iter_parquet_records(source: str | BinaryIO, where: str | None = None) -> Iterator[RawRecord]:
    """Records of a Parquet file with columns `image` and `caption` (and optionally `key`).

    Keys come from the `key` column when there is one, else the row number ("%08d"); a repeated key is a
    duplicate_key record. A file that cannot be parsed ends the iteration with one `corrupt_member` record;
    one without the columns raises UnreadableShard naming `where` (default: `source`).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = where or str(source)
    try:
        parquet = pq.ParquetFile(source)
    except pa.ArrowInvalid as error:
        logger.warning("unreadable Parquet shard %s: %s", where, error)
        yield RawRecord(key="", image=None, caption=None, skip_reason="corrupt_member")
        return
    names = parquet.schema_arrow.names
    missing = {"image", "caption"} - set(names)
    if missing:
        raise UnreadableShard(
            f"Parquet file {where} lacks column(s) {sorted(missing)} (it has {names}), so it is not an image-caption "
            "shard"
        )
    columns = ["image", "caption"] + (["key"] if "key" in names else [])
    row, seen = 0, set()
    try:
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            data = batch.to_pydict()
            keys = data.get("key") or [f"{row + i:08d}" for i in range(batch.num_rows)]
            for key, image, caption in zip(map(str, keys), data["image"], data["caption"]):
                if key in seen:
                    yield RawRecord(key=key, image=None, caption=None, skip_reason="duplicate_key")
                    continue
                seen.add(key)
                yield RawRecord(
                    key=key, image=_image_bytes(image), caption=caption if isinstance(caption, str) else None
                )
            row += batch.num_rows
    except pa.ArrowInvalid as error:
        logger.warning("corrupt Parquet shard %s after row %d: %s", where, row, error)
        yield RawRecord(key=f"{row:08d}", image=None, caption=None, skip_reason="corrupt_member")


def read_metadata_captions(uri: str) -> dict[str, str]:
    """key -> caption of an img2dataset metadata Parquet ({} when it has no such columns or cannot be read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    try:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            if not {"key", "caption"} <= set(parquet.schema_arrow.names):
                return {}
            table = parquet.read(columns=["key", "caption"])
    except (OSError, pa.ArrowException) as error:
        logger.warning("metadata %s is unreadable (%s); its captions are not used", uri, error)
        return {}
    return {
        str(k): c
        for k, c in zip(table.column("key").to_pylist(), table.column("caption").to_pylist())
        if isinstance(c, str)
    }


def iter_shard_records(shard: Shard) -> Iterator[RawRecord]:
    """Records of one listed shard, opened through fsspec; raises UnreadableShard for a file that is not one."""
    fs, path = storage.filesystem(shard.uri)
    with fs.open(path, "rb") as handle:
        if shard.format == "webdataset":
            captions = read_metadata_captions(shard.metadata_uri) if shard.metadata_uri else {}
            yield from iter_tar_records(handle, captions, where=shard.uri)
        else:
            yield from iter_parquet_records(handle, where=shard.uri)


def decode_record(record: RawRecord, min_side: int = 64, image_size: int | None = None) -> Sample | Skipped:
    """Decode and validate one record; never raises for bad data. With `image_size` (the side the image will be
    resized to), a large JPEG is decoded at a reduced scale, never below that side (gap3d.data.images)."""
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
        image = decode_image(record.image, image_size)
    except ValueError:
        return Skipped(record.key, "undecodable_image")
    if min(image.size) < min_side:
        return Skipped(record.key, "image_too_small")
    return Sample(record.key, image, caption)
