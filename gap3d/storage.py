"""Paths and object-storage URIs (s3://, gs://, file://, local) through fsspec.

S3 endpoint, credentials and region come from the standard AWS environment variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), so real S3, MinIO and moto all work unchanged.
"""

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import fsspec

logger = logging.getLogger(__name__)

_COMPLETE_MARKER = ".gap3d_complete"


def is_remote(uri: str) -> bool:
    """True for URIs with a non-local scheme (s3://, gs://, ...)."""
    protocol = fsspec.core.split_protocol(str(uri))[0]
    return protocol not in (None, "file", "local")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path inside it."""
    return fsspec.core.url_to_fs(str(uri))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or local path."""
    return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])


def cache_root() -> Path:
    """Where remote checkpoints are downloaded: $GAP3D_CACHE or ~/.cache/gap3d."""
    return Path(os.environ.get("GAP3D_CACHE", Path.home() / ".cache" / "gap3d"))


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
    target.parent.mkdir(parents=True, exist_ok=True)
    # Processes on one node (training workers, replicas) share the cache: one downloads, the others wait.
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
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
    parts = sorted(f"{name}:{info.get('size')}:{info.get('ETag') or info.get('LastModified') or info.get('mtime')}" for name, info in entries.items())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def upload_dir(local: str | Path, uri: str) -> None:
    """Copy a local directory's contents to `uri` (local path or object storage)."""
    fs, root = filesystem(uri)
    fs.makedirs(root, exist_ok=True)
    fs.put(str(local).rstrip("/") + "/", root.rstrip("/"), recursive=True)
