"""Paths and object-storage URIs (s3://, gs://, file://, local) through fsspec.

S3 endpoint, credentials and region come from the standard AWS environment variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), so real S3, MinIO and moto all work unchanged.
Every file a job publishes goes through `publish_file`: readers never see half of one.
"""

import hashlib
import logging
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
import pyarrow.fs
from filelock import FileLock

logger = logging.getLogger(__name__)

_COMPLETE_MARKER = ".gap3d_complete"
GLOB_CHARS = "*?["
PARTIAL_SUFFIX = ".partial"  # temporary files of `publish_file`, beside their target on local disks
STAGING_DIR = "gap3d-staging"  # under the system temp directory: per-process dirs for files bound for object storage


def is_remote(uri: str) -> bool:
    """True for URIs with a non-local scheme (s3://, gs://, ...)."""
    protocol = fsspec.core.split_protocol(str(uri))[0]
    return protocol not in (None, "file", "local")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path inside it."""
    return fsspec.core.url_to_fs(str(uri))


def same_filesystem(first: str, second: str) -> bool:
    """Whether two URIs live on the same storage (both local, or the same remote scheme)."""
    first_protocol, second_protocol = (fsspec.core.split_protocol(str(uri))[0] for uri in (first, second))
    return is_remote(first) == is_remote(second) and (not is_remote(first) or first_protocol == second_protocol)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or local path."""
    return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])


def has_glob(uri: str) -> bool:
    """Whether `uri` holds a glob character."""
    return any(char in str(uri) for char in GLOB_CHARS)


def glob_root(path: str) -> str:
    """The directory above the first glob character: "d/x/train-*.tar" -> "d/x"."""
    return posixpath.dirname(path[: min(path.index(c) for c in GLOB_CHARS if c in path)])


def with_scheme(uri: str, path: str) -> str:
    """A path found by listing `uri`'s filesystem, as a URI of the same scheme ("bucket/k" -> "s3://bucket/k")."""
    return filesystem(uri)[0].unstrip_protocol(path) if is_remote(uri) else path


def cache_root() -> Path:
    """Where remote checkpoints are downloaded and tiny models are built: $GAP3D_CACHE or ~/.cache/gap3d."""
    return Path(os.environ.get("GAP3D_CACHE", Path.home() / ".cache" / "gap3d")).expanduser()


def cache_lock(path: Path) -> FileLock:
    """An inter-process lock beside `path`: processes sharing the cache build or download it once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path.parent / f"{path.name}.lock"))


def local_dir(uri: str) -> Path:
    """A local directory holding the contents of `uri`, downloading a remote one once into the cache."""
    uri = str(uri)
    if not is_remote(uri):
        path = Path(fsspec.core.strip_protocol(uri) if uri.startswith("file://") else uri).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {path} does not exist")
        return path
    target = cache_root() / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:24]
    fs, root = filesystem(uri)
    if not fs.isdir(root):
        raise FileNotFoundError(f"checkpoint directory {uri} does not exist (or is empty)")
    version = _listing_fingerprint(fs, root)
    marker = target / _COMPLETE_MARKER
    with cache_lock(target):
        if marker.exists() and marker.read_text() == version:
            return target
        logger.info("downloading %s to %s", uri, target)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".partial-"))
        try:
            fs.get(root.rstrip("/") + "/", str(staging), recursive=True)
            (staging / _COMPLETE_MARKER).write_text(version)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _listing_fingerprint(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """Hash of every file's name, size and ETag/mtime under root: a changed remote checkpoint is downloaded again."""
    entries = fs.find(root, detail=True)
    parts = sorted(
        f"{name}:{info.get('size')}:{info.get('ETag') or info.get('LastModified') or info.get('mtime')}"
        for name, info in entries.items()
    )
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def upload_dir(local: str | Path, uri: str) -> None:
    """Copy a local directory's contents to `uri` (local path or object storage)."""
    fs, root = filesystem(uri)
    fs.makedirs(root, exist_ok=True)
    fs.put(str(local).rstrip("/") + "/", root.rstrip("/"), recursive=True)


def _staging_root() -> str:
    return os.path.join(tempfile.gettempdir(), STAGING_DIR)


def temp_file_for(uri: str) -> str:
    """A new local temporary file to build `uri` in before `publish_file`.

    Beside the target on a local filesystem (so publishing is an atomic rename; the leading dot hides it
    from listings); for object storage, in this process's own staging directory, which
    `remove_stale_staging` deletes once the process is gone.
    """
    if is_remote(uri):
        directory = os.path.join(_staging_root(), str(os.getpid()))
    else:
        directory = posixpath.dirname(filesystem(uri)[1])
    os.makedirs(directory, exist_ok=True)
    handle, path = tempfile.mkstemp(prefix=f".{posixpath.basename(str(uri))}.", suffix=PARTIAL_SUFFIX, dir=directory)
    os.close(handle)
    os.chmod(path, 0o644)  # mkstemp's 0600 would survive the rename
    return path


@contextmanager
def staging_dir(prefix: str) -> Iterator[Path]:
    """A new local temporary directory in this process's staging directory, removed on exit (and by
    `remove_stale_staging` once the process is gone, if it was killed first)."""
    root = os.path.join(_staging_root(), str(os.getpid()))
    os.makedirs(root, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_staging() -> int:
    """Delete this machine's staging directories of processes that are gone (killed writers); returns how many."""
    root = _staging_root()
    stale = [
        name
        for name in (os.listdir(root) if os.path.isdir(root) else [])
        if name.isdigit() and not _process_exists(int(name))
    ]
    for name in stale:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if stale:
        logger.info("removed the staging files of %d killed writers from %s", len(stale), root)
    return len(stale)


def publish_file(local_path: str, uri: str) -> None:
    """Move a finished local file to `uri` in one step (a rename, or a single upload); the local file is gone after."""
    fs, target = filesystem(uri)
    try:
        if is_remote(uri):
            fs.put_file(local_path, target)
        else:
            os.replace(local_path, target)
    finally:
        if os.path.exists(local_path):
            os.remove(local_path)


def _abort_uploads(fs: fsspec.AbstractFileSystem, root: str) -> int:
    """Abort the unfinished multipart uploads under an S3 prefix (a writer killed mid-upload leaves one, billed but
    invisible)."""
    if not hasattr(fs, "call_s3"):
        return 0
    bucket, _, prefix = root.partition("/")
    aborted, markers = 0, {}
    while True:
        page = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix.rstrip("/") + "/", **markers)
        for upload in page.get("Uploads", []):
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            aborted += 1
        if not page.get("IsTruncated"):
            return aborted
        markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}


def remove_partial_files(directory_uri: str) -> int:
    """Delete what killed writers left under a directory: `.partial` files, and unfinished uploads on S3; returns how
    many."""
    fs, root = filesystem(directory_uri)
    fs.invalidate_cache(root)
    stale = fs.glob(join(root, f"**/.*{PARTIAL_SUFFIX}")) if fs.isdir(root) else []
    for path in stale:
        fs.rm_file(path)
    count = len(stale) + (_abort_uploads(fs, root) if is_remote(directory_uri) else 0)
    if count:
        logger.info("removed %d temporary files and uploads left by an interrupted run in %s", count, directory_uri)
    return count


def arrow_filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem for `uri` that carries its S3 endpoint and keys, so it works in any Ray worker.

    Worker processes may not share the driver's AWS_* environment, so the endpoint and credentials the
    driver sees are passed explicitly to an s3fs filesystem (which pickles with them). s3fs, unlike
    pyarrow's own S3 client, writes small files in one request, which every S3 implementation accepts.
    """
    if not str(uri).startswith("s3://"):
        return pyarrow.fs.FileSystem.from_uri(str(uri) if "://" in str(uri) else os.path.abspath(uri))
    import s3fs

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    s3 = s3fs.S3FileSystem(
        key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        token=os.environ.get("AWS_SESSION_TOKEN"),
        endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        client_kwargs={"region_name": region} if region else {},
        skip_instance_cache=True,
    )
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(s3)), str(uri)[len("s3://") :].rstrip("/")


def publish_bytes(data: bytes, uri: str) -> None:
    """Write `data` to `uri` whole: readers see the old object or the new one, never part of it."""
    local_path = temp_file_for(uri)
    with open(local_path, "wb") as handle:
        handle.write(data)
    publish_file(local_path, uri)


def fsspec_of(arrow_fs: pyarrow.fs.FileSystem) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem behind one of `arrow_filesystem`'s (s3fs with the keys it carries, or the local one)."""
    if isinstance(arrow_fs, pyarrow.fs.PyFileSystem):
        return arrow_fs.handler.fs
    return fsspec.filesystem("file")
