"""Feature rows -> training batches, and start-up checks on a feature directory (no Ray here)."""

import logging
import os

import numpy as np
import pyarrow.fs
import pyarrow.parquet as pq
import torch

from gap3d import storage
from gap3d.config import Gap3DConfig
from gap3d.features import MANIFEST_NAME, FeatureManifest, caches_from_rows, dino_from_rows, latents_from_rows, soft_token_mode
from gap3d.training import TrainBatch

logger = logging.getLogger(__name__)


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


_GLOB_CHARS = "*?["


def split_pattern(uri: str) -> tuple[str, str]:
    """(feature directory, shard pattern): "d/train-*.parquet" -> ("d", "train-*.parquet"); "d" -> ("d", "**/*.parquet")."""
    uri = str(uri).rstrip("/")
    if any(char in uri for char in _GLOB_CHARS):
        directory, pattern = uri.rsplit("/", 1)
        if any(char in directory for char in _GLOB_CHARS):
            raise ValueError(f"feature URI {uri}: only the file name may hold a glob, e.g. s3://bucket/features/train-*.parquet")
        return directory, pattern
    return uri, "**/*.parquet"


def read_manifest(uri: str) -> FeatureManifest:
    """The manifest.json of a feature directory (or of a glob's directory); a clear error when there is none."""
    directory, _ = split_pattern(uri)
    fs, root = storage.filesystem(directory)
    path = storage.join(root, MANIFEST_NAME)
    if not fs.exists(path):
        raise FileNotFoundError(f"no feature manifest at {storage.join(directory, MANIFEST_NAME)}; run ray_jobs/preprocess.py to write features there")
    with fs.open(path, "r") as handle:
        return FeatureManifest.from_json(handle.read())


def feature_files(uri: str) -> list[str]:
    """URIs of the Parquet feature shards of a directory (recursively) or matching a file-name glob, sorted."""
    directory, pattern = split_pattern(uri)
    fs, root = storage.filesystem(directory)
    files = sorted(fs.glob(storage.join(root, pattern)))
    if not files:
        raise FileNotFoundError(f"no *.parquet feature shards at {uri}; run ray_jobs/preprocess.py to write them")
    protocol = uri.split("://", 1)[0] + "://" if storage.is_remote(uri) else ""
    return [protocol + path.lstrip("/") if protocol else path for path in files]


def check_features(uri: str, config: Gap3DConfig) -> FeatureManifest:
    """Manifest of the features at `uri` after checking they exist and match the configured encoders and aligner."""
    manifest = read_manifest(uri)
    manifest.check_compatible(config)
    expected = [config.aligner.num_tokens, config.aligner.token_dim]
    if list(manifest.dino_shape) != expected:
        raise ValueError(f"features at {uri} hold DINOv2 targets of shape {manifest.dino_shape} but the aligner generates {expected} (aligner.grid_size/token_dim)")
    feature_files(uri)
    return manifest


def count_rows(uri: str) -> int:
    """Rows over all feature shards (from the Parquet footers only)."""
    total = 0
    for path in feature_files(uri):
        fs, inner = storage.filesystem(path)
        with fs.open(inner, "rb") as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def collate_rows(rows: dict[str, np.ndarray | list], manifest: FeatureManifest, mode: str) -> TrainBatch:
    """A batch of feature rows (column -> array of per-row values) -> TrainBatch on CPU, float32."""
    dino = dino_from_rows(list(rows["dino"]), manifest)  # (B, N, D)
    if mode == "prompt_cache":
        caches = caches_from_rows(list(rows["prompt_cache"]), list(rows["input_ids"]), list(rows["next_position"]), manifest)
        return TrainBatch(dino=dino, caches=caches)
    return TrainBatch(dino=dino, latents=latents_from_rows(list(rows["soft_latents"]), manifest))


class RowCollator:
    """Picklable collate_fn for Ray Data: numpy column batch -> TrainBatch."""

    def __init__(self, manifest: FeatureManifest, mode: str):
        self.manifest = manifest
        self.mode = mode

    def __call__(self, rows: dict[str, np.ndarray]) -> TrainBatch:
        return collate_rows(rows, self.manifest, self.mode)


def load_rows(uri: str, config: Gap3DConfig, limit: int | None = None) -> tuple[TrainBatch, list[str]]:
    """Read up to `limit` feature rows into memory (for evaluation) -> (TrainBatch, captions)."""
    manifest = check_features(uri, config)
    mode = soft_token_mode(config)
    columns = ["caption", "dino", "input_ids", "next_position", mode]
    tables = []
    remaining = limit
    for path in feature_files(uri):
        fs, inner = storage.filesystem(path)
        with fs.open(inner, "rb") as handle:
            table = pq.read_table(handle, columns=columns)
        tables.append(table if remaining is None else table.slice(0, remaining))
        remaining = None if remaining is None else remaining - tables[-1].num_rows
        if remaining == 0:
            break
    rows = {name: [value for table in tables for value in table.column(name).to_numpy(zero_copy_only=False)] for name in columns}
    batch = collate_rows(rows, manifest, mode)
    return batch, [str(caption) for caption in rows["caption"]]


def condition_for(batch: TrainBatch, prompt_encoder, device: torch.device) -> torch.Tensor:
    """Condition (B, s, d_vlm) of a batch: soft tokens through the VLM on its caches, or its stored latents."""
    with torch.no_grad():
        if batch.caches is not None:
            dtype = prompt_encoder.soft_tokens.dtype
            caches = batch.to(device, dtype).caches
            return torch.cat([prompt_encoder.soft_latents(caches[i : i + 32]) for i in range(0, len(caches), 32)])
        return batch.latents.to(device)
