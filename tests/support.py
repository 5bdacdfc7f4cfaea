"""What several test modules share: small job configs, and feature directories built by the production code.

Features are written the way ray_jobs/preprocess.py writes them (gap3d.data.encode.FeatureEncoder, then
gap3d.features.store's atomic shard writer and manifest), only without Ray, so training tests do not depend on
the preprocessing job and cannot drift from the format it writes.
"""

import ctypes
import json
import os
import select
import signal
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil

from gap3d import storage
from gap3d.build import derive_shapes
from gap3d.config import Gap3DConfig, load_job_config
from gap3d.data.encode import FeatureEncoder
from gap3d.features.format import feature_schema
from gap3d.features.identity import encoder_identity, soft_token_mode
from gap3d.features.store import chunk_file_name, write_feature_file, write_manifest, write_shard_record
from miniature.world import render_scene, sample_scene
from ray_jobs.run_checkpoints import RECORD_NAME, RunStorage
from ray_jobs.train import TRAIN_SECTIONS

# Smaller than the tiny preset so multi-process training runs in seconds on 2 cores: an 8x8 grid (69 tokens).
SMALL_OVERRIDES = (
    "dino.image_size=112",
    "aligner.hidden_size=64",
    "aligner.depth=2",
    "aligner.num_heads=2",
    "train.log_every=5",
    "train.checkpoint_every=10",
    "train.eval_every=1000",
)


def small_job(*overrides: str) -> tuple[Gap3DConfig, dict]:
    """The tiny preset shrunk for fast training tests, plus `overrides`, its shapes derived: (config,
    {"scaling", "encode"})."""
    config, sections = load_job_config("tiny", overrides=[*SMALL_OVERRIDES, *overrides], sections=TRAIN_SECTIONS)
    return derive_shapes(config), sections


def small_config(*overrides: str) -> Gap3DConfig:
    """The library part of `small_job`."""
    return small_job(*overrides)[0]


def write_feature_dir(config: Gap3DConfig, scenes: list, out: Path, rows_per_shard: int = 128) -> Path:
    """Encode scenes with the production FeatureEncoder into one-chunk shards `<out>/part-NNNNN.00000.parquet` +
    manifest.json."""
    encoder = FeatureEncoder(config)
    schema = feature_schema(soft_token_mode(config))
    manifest = encoder.manifest
    for index, start in enumerate(range(0, len(scenes), rows_per_shard)):
        part = scenes[start : start + rows_per_shard]
        images = np.stack([render_scene(scene, config.dino.image_size) for scene in part])
        table = encoder.encode(
            [f"{start + i:08d}" for i in range(len(part))], [scene.caption for scene in part], images
        )
        stem = f"part-{index:05d}"
        name = chunk_file_name(stem, 0)
        stats = write_feature_file(
            str(out),
            name,
            schema,
            [(table, {})],
            {"input": "synthetic", "rows_in": len(part), "encoders": manifest.encoders},
        )
        record = {
            "input": "synthetic",
            "files": {name: stats["bytes"]},
            "rows": stats["rows"],
            "rows_in": stats["rows_in"],
            "skipped": stats["skipped"],
        }
        write_shard_record(str(out), stem, {**record, "encoders": manifest.encoders})
        manifest.shards[stem] = record
    manifest.count_totals()
    write_manifest(str(out), manifest)
    return out


_written: dict[str, tuple[Path, Path]] = {}


def synthetic_features(config: Gap3DConfig, num: int, seed: int = 0, rows_per_shard: int = 128) -> tuple[Path, Path]:
    """(train_dir, eval_dir) of features for `num` synthetic scenes; held-out attribute pairs go to eval.

    Written once per process for each (encoders, num, seed, rows_per_shard).
    """
    key = json.dumps([encoder_identity(config), num, seed, rows_per_shard], sort_keys=True)
    if key not in _written:
        scenes = [sample_scene(seed, index) for index in range(num)]
        root = Path(tempfile.mkdtemp(prefix="gap3d-features-"))
        _written[key] = (
            write_feature_dir(config, [s for s in scenes if s.split == "train"], root / "train", rows_per_shard),
            write_feature_dir(config, [s for s in scenes if s.split == "eval"], root / "eval", rows_per_shard),
        )
    return _written[key]


def upload_features(local: Path, uri: str) -> str:
    """Copy a feature directory to object storage; returns `uri`."""
    storage.upload_dir(local, uri)
    return uri


def write_complete_checkpoint(run_uri: str, step: int, ranks: dict[int, dict[str, bytes]]) -> str:
    """Checkpoint `step` of a run written as training workers write one (ray_jobs/run_checkpoints.py): every rank's
    files {name: content} uploaded from a local directory, then rank 0's completion record; returns its URI."""
    run = RunStorage.at(run_uri)
    writers = []
    for rank, files in ranks.items():
        with tempfile.TemporaryDirectory() as directory:
            for name, content in files.items():
                (Path(directory) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(directory) / name).write_bytes(content)
            writers.append({"rank": rank, "node": f"node-{rank}", "files": run.upload(Path(directory), step)})
    run.write_record(step, writers)
    return run.checkpoint_uri(step)


def train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train worker processes of this test session's Ray cluster (Ray names them
    `ray::RayTrainWorker...`); another cluster on the machine, such as a demo running beside the tests, is not
    touched."""
    ours = {child.pid for child in psutil.Process().children(recursive=True)}
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid in ours and any(part.startswith("ray::RayTrainWorker") for part in proc.info["cmdline"] or ()):
            pids.append(proc.pid)
    return sorted(pids)


class KillTrainWorkerWhen:
    """In the background, SIGKILL one Ray Train worker process as soon as `ready()` is true (polled), once.

    A real process kill, as a crashed node or OOM killer would do it: nothing in the training code knows.
    """

    def __init__(self, ready):
        self.ready = ready
        self.killed: int | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop = threading.Event()

    def __enter__(self) -> "KillTrainWorkerWhen":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.ready():
                pids = train_worker_pids()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    self.killed = pids[0]
                    return
            time.sleep(0.05)


class KillTrainWorkerInSave:
    """In the background, SIGKILL the Ray Train worker that starts saving checkpoint `step`, once.

    The worker's staging directory for that checkpoint lives for tens of milliseconds, which polling misses on a
    loaded machine; inotify reports its creation as it happens, and its parent directory is named by the saving
    process's PID (gap3d.storage.staging_dir), so the kill needs no process lookup and lands inside the save.
    """

    def __init__(self, step: int):
        self.prefix = f"gap3d-ckpt-{step}-"
        self.root = Path(tempfile.gettempdir()) / storage.STAGING_DIR
        self.killed: int | None = None
        self._watches: dict[int, Path] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "KillTrainWorkerInSave":
        self.root.mkdir(parents=True, exist_ok=True)
        self._fd = _LIBC.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._watch(self.root)
        for directory in self.root.iterdir():
            self._watch_if_ours(directory)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        os.close(self._fd)

    def _watch(self, directory: Path) -> None:
        descriptor = _LIBC.inotify_add_watch(self._fd, str(directory).encode(), _IN_CREATE)
        if descriptor >= 0:  # a directory removed meanwhile is no one's save
            self._watches[descriptor] = directory

    def _watch_if_ours(self, directory: Path) -> None:
        if directory.name.isdigit() and int(directory.name) in train_worker_pids():
            self._watch(directory)

    def _run(self) -> None:
        while not self._stop.is_set() and self.killed is None:
            if select.select([self._fd], [], [], 0.1)[0]:
                for descriptor, name in _inotify_events(os.read(self._fd, 65536)):
                    self._created(self._watches.get(descriptor), name)

    def _created(self, parent: Path | None, name: str) -> None:
        if parent == self.root:
            self._watch_if_ours(parent / name)
        elif parent is not None and name.startswith(self.prefix) and self.killed is None:
            os.kill(int(parent.name), signal.SIGKILL)
            self.killed = int(parent.name)


_LIBC = ctypes.CDLL(None, use_errno=True)
_IN_CREATE = 0x100
_EVENT_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len, then a NUL-padded name


def _inotify_events(data: bytes) -> Iterator[tuple[int, str]]:
    """(watch descriptor, created name) for each event in one read of an inotify descriptor."""
    offset = 0
    while offset < len(data):
        descriptor, _, _, length = _EVENT_HEADER.unpack_from(data, offset)
        offset += _EVENT_HEADER.size
        yield descriptor, data[offset : offset + length].rstrip(b"\0").decode()
        offset += length


def checkpoint_complete(run_uri: str, step: int):
    """A `ready()` for KillTrainWorkerWhen: checkpoint `step` of the run at `run_uri` counts (its completion record
    is written, ray_jobs/run_checkpoints.py). Its directory appearing is not enough: every rank must have uploaded."""
    run = RunStorage.at(run_uri)
    record = storage.join(run.checkpoint_path(step), RECORD_NAME)

    def ready() -> bool:
        run.fs.invalidate_cache()
        return run.fs.exists(record)

    return ready
