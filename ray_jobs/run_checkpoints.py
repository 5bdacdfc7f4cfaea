"""A training run's checkpoints in storage: where they are, when one counts, which one a rerun resumes from.

A checkpoint is `<run>/checkpoint_<step>/`. Every rank uploads the files it wrote there itself; once all have,
rank 0 checks that each file is in storage with the size its rank wrote and writes the completion record
`complete.json` (every file's size and sha256, and the rank and node that wrote it). The record is written
last and before any rank reports the checkpoint to Ray Train, so it is what makes a checkpoint: a checkpoint
Ray never registered (the driver died just after the save) counts when its record matches; one without a
record (a save cut short) or whose files do not match it (truncated, missing, changed) does not.

A rerun verifies checkpoints newest first and resumes from the first that matches its record. Each one it
passes over is moved to `<run>/invalid/` with the reason in `INVALID.txt`, and logged naming the file, so
neither Ray Train nor a later rerun mistakes it for a checkpoint. Retention (train.keep_checkpoints) is
applied here too, after each record is written.
"""

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs

from gap3d import storage

logger = logging.getLogger("gap3d.train")

RECORD_NAME = "complete.json"
INVALID_DIR = "invalid"
INVALID_NOTE = "INVALID.txt"
_CHECKPOINT_DIR = re.compile(r"checkpoint_(\d{8})$")  # checkpoint_dir_name's pattern
_HASH_BLOCK = 2**24


def checkpoint_dir_name(step: int) -> str:
    """The directory name of the checkpoint of optimiser step `step` under a run."""
    return f"checkpoint_{step:08d}"


def file_entries(directory: Path) -> dict[str, dict]:
    """What a rank wrote into its local checkpoint directory: relative path -> {"size", "sha256"}."""
    entries = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        with open(path, "rb") as handle:
            entries[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(handle)}
    return entries


def _sha256(handle) -> str:
    digest = hashlib.sha256()
    while block := handle.read(_HASH_BLOCK):
        digest.update(block)
    return digest.hexdigest()


def newest_valid_checkpoint(run_uri: str) -> str | None:
    """URI of the newest checkpoint under the run at `run_uri` that matches its record (the ones it passes over are
    logged, not moved), or None when there is none (`run_uri` may be a checkpoint itself)."""
    run = RunStorage.at(run_uri)
    step = run.newest_valid(set_aside=False)
    return None if step is None else run.checkpoint_uri(step)


@dataclass(frozen=True)
class RunStorage:
    """The run directory `<storage>/<name>` on the filesystem Ray Train writes to (it pickles with its keys, so
    workers on any node reach it without the driver's environment)."""

    arrow_fs: pyarrow.fs.FileSystem  # the RunConfig's storage_filesystem
    path: str  # the run directory inside it
    uri: str  # the same directory with --storage's scheme, for messages

    @classmethod
    def at(cls, run_uri: str) -> "RunStorage":
        arrow_fs, path = storage.arrow_filesystem(run_uri)
        return cls(arrow_fs, path, str(run_uri).rstrip("/"))

    @property
    def fs(self):
        return storage.fsspec_of(self.arrow_fs)

    def checkpoint_path(self, step: int) -> str:
        return storage.join(self.path, checkpoint_dir_name(step))

    def checkpoint_uri(self, step: int) -> str:
        return storage.join(self.uri, checkpoint_dir_name(step))

    def steps(self) -> list[int]:
        """Steps of the `checkpoint_<step>` directories under the run, newest first, whatever their state."""
        fs = self.fs
        fs.invalidate_cache(self.path)
        if not fs.isdir(self.path):
            return []
        return sorted(
            (
                int(match.group(1))
                for entry in fs.ls(self.path, detail=False)
                if (match := _CHECKPOINT_DIR.search(entry.rstrip("/")))
            ),
            reverse=True,
        )

    def upload(self, directory: Path, step: int) -> dict[str, dict]:
        """Copy one rank's local checkpoint files into checkpoint `step` -> their file_entries."""
        entries = file_entries(directory)
        fs, target = self.fs, self.checkpoint_path(step)
        for name in entries:
            destination = storage.join(target, name)
            fs.makedirs(destination.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(directory / name), destination)
        return entries

    def discard_record(self, step: int) -> None:
        """Remove checkpoint `step`'s record, if any, before its files are written again (a restarted group redoing
        the step)."""
        fs, path = self.fs, storage.join(self.checkpoint_path(step), RECORD_NAME)
        if fs.exists(path):
            fs.rm_file(path)

    def write_record(self, step: int, writers: list[dict]) -> None:
        """Write checkpoint `step`'s completion record from every rank's {"rank", "node", "files"}, after checking
        that each file is in storage with the size its rank wrote; raise naming the first that is not."""
        files = {
            name: {**entry, "rank": writer["rank"], "node": writer["node"]}
            for writer in writers
            for name, entry in writer["files"].items()
        }
        found = self._sizes(step)
        for name, entry in sorted(files.items()):
            if found.get(name) != entry["size"]:
                state = "missing" if name not in found else f"{found[name]} bytes, not {entry['size']},"
                raise RuntimeError(
                    f"{storage.join(self.checkpoint_uri(step), name)}, written by rank {entry['rank']} on node "
                    f"{entry['node']}, is {state} "
                    "in storage as rank 0 sees it: is --storage shared by every node?"
                )
        record = {"step": step, "files": files}
        with self.fs.open(storage.join(self.checkpoint_path(step), RECORD_NAME), "w") as handle:
            handle.write(json.dumps(record, indent=1, sort_keys=True))

    def _sizes(self, step: int) -> dict[str, int]:
        fs, root = self.fs, self.checkpoint_path(step)
        fs.invalidate_cache(root)
        return {path[len(root.rstrip("/")) + 1 :]: info["size"] for path, info in fs.find(root, detail=True).items()}

    def problem(self, step: int) -> str | None:
        """Why checkpoint `step` does not count (naming the file), or None when every file matches its record."""
        uri, fs = self.checkpoint_uri(step), self.fs
        record_path = storage.join(self.checkpoint_path(step), RECORD_NAME)
        if not fs.exists(record_path):
            return f"{uri} has no {RECORD_NAME}: its save never finished"
        try:
            with fs.open(record_path, "r") as handle:
                files = json.load(handle)["files"]
        except (ValueError, KeyError, OSError) as error:
            return f"{storage.join(uri, RECORD_NAME)} is unreadable: {error}"
        found = self._sizes(step)
        for name, entry in sorted(files.items()):
            if name not in found:
                return f"{storage.join(uri, name)} is missing"
            if found[name] != entry["size"]:
                return f"{storage.join(uri, name)} has {found[name]} bytes, its record {entry['size']}"
        for name, entry in sorted(files.items()):
            with fs.open(storage.join(self.checkpoint_path(step), name), "rb") as handle:
                if _sha256(handle) != entry["sha256"]:
                    return f"{storage.join(uri, name)} does not match the sha256 in its record"
        return None

    def newest_valid(self, set_aside: bool) -> int | None:
        """Step of the newest checkpoint that matches its record, or None. Each newer one is logged with its
        problem and, with `set_aside`, moved to `<run>/invalid/`."""
        for step in self.steps():
            problem = self.problem(step)
            if problem is None:
                return step
            logger.warning("skipping checkpoint %s: %s", self.checkpoint_uri(step), problem)
            if set_aside:
                self.set_aside(step, problem)
        return None

    def set_aside(self, step: int, reason: str) -> str:
        """Move checkpoint `step` to `<run>/invalid/checkpoint_<step>-<time>/` with `reason` in INVALID.txt -> its new
        URI."""
        name = f"{checkpoint_dir_name(step)}-{time.strftime('%Y%m%dT%H%M%S')}"
        fs, target = self.fs, storage.join(self.path, INVALID_DIR, name)
        source = self.checkpoint_path(step)
        fs.makedirs(target, exist_ok=True)
        for file in self._sizes(step):  # file by file: object stores have no directories to rename
            fs.makedirs(storage.join(target, file).rsplit("/", 1)[0], exist_ok=True)
            fs.cp_file(storage.join(source, file), storage.join(target, file))
        fs.rm(source, recursive=True)
        with fs.open(storage.join(target, INVALID_NOTE), "w") as handle:
            handle.write(reason + "\n")
        moved = storage.join(self.uri, INVALID_DIR, name)
        logger.warning("moved %s to %s", self.checkpoint_uri(step), moved)
        return moved

    def prune(self, step: int, keep: int) -> None:
        """After checkpoint `step` is complete: delete the older checkpoint directories but the newest `keep` - 1
        complete ones (older incomplete ones are leftovers of saves cut short)."""
        fs, kept = self.fs, 1
        for older in (s for s in self.steps() if s < step):
            if kept < keep and fs.exists(storage.join(self.checkpoint_path(older), RECORD_NAME)):
                kept += 1
                continue
            fs.rm(self.checkpoint_path(older), recursive=True)
