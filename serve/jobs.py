"""Async generation jobs kept in object storage, so that any ingress replica can answer and a restart loses nothing.

Layout under the store's root (a directory or an s3:// prefix), one prefix per job:
    <id>/request.json   the request body without its image, written once
    <id>/image          the request's image field (base64 or a data: URL), deleted once the job has ended
    <id>/state.json     the JobRecord, rewritten whole at every change
    <id>/result.<fmt>   the asset, once the job has succeeded
A job goes queued -> running -> succeeded | failed | cancelled. The runner that claims a job stamps it with a
claim id and its replica's actor name, and refreshes `heartbeat_at`. A running job whose runner is known to be
dead, or whose heartbeat is older than `lease_s`, has lost its worker: it is queued again until `max_attempts`
runs were made, then failed, so no job stays "running" forever. A queued job that nobody starts within
`max_queued_s` fails (its queue message was lost). Ended jobs are deleted `ttl_s` after they end. Writes are
whole-object (gap3d.storage.publish_bytes); two writers racing on one record (a DELETE against a runner's last
write) leave one of the two versions, never a torn one.
"""

import dataclasses
import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gap3d import storage

logger = logging.getLogger(__name__)

TERMINAL = ("succeeded", "failed", "cancelled")
JOB_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class JobsConfig:
    """Async jobs (the `jobs:` builder arg of serve/config.yaml)."""

    store: str = "~/.cache/gap3d/serve/jobs"  # directory or s3:// prefix holding job records and results
    broker: str = "redis://127.0.0.1:6379/0"  # broker (and result backend) of Ray Serve's Celery task consumer
    queue: str = "gap3d-generate"  # broker queue the JobRunner consumes
    ttl_s: float = 86400.0  # an ended job's record and result are deleted this long after it ended
    deadline_s: float = 600.0  # a run of a job is cancelled (and the job failed) after this long
    max_queued_s: float = (
        3600.0  # a job not started within this long fails (its queue message was lost, or the queue is hopeless)
    )
    lease_s: float = 30.0  # a running job whose worker has not reported for this long lost its worker
    max_attempts: int = 2  # runs of a job whose worker died before the job is failed
    sweep_every_s: float = 5.0  # how often the ingress sweeps the store (lost workers, expiry, job counts)
    max_active_per_key: int = 100  # queued or running jobs one API key may have; more are refused with 429
    max_stored_per_key: int = 1000  # jobs one API key may have stored (ended ones until their ttl_s); then 429

    def __post_init__(self):
        for name in ("ttl_s", "deadline_s", "max_queued_s", "lease_s", "sweep_every_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"jobs.{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_attempts", "max_active_per_key"):
            if getattr(self, name) < 1:
                raise ValueError(f"jobs.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_stored_per_key < self.max_active_per_key:
            raise ValueError(
                f"jobs.max_stored_per_key ({self.max_stored_per_key}) must be >= jobs.max_active_per_key "
                f"({self.max_active_per_key}): every active job is stored"
            )


@dataclass
class JobRecord:
    id: str
    request_sha256: str  # of the request body: a replayed Idempotency-Key must come with the same body
    file_format: str  # of the result
    created_at: float
    queued_at: float
    owner: str = ""  # digest of the submitter's API key (serve/auth.py): quotas count per owner
    status: str = "queued"
    stage: str | None = None  # stage running now
    progress: float = 0.0  # share of the stages done, 0..1
    attempts: int = 0  # runs started
    claim: str | None = None  # id of the run that owns the job while it is running
    runner: str | None = None  # actor name of the replica running it (None when unknown)
    heartbeat_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    timings: dict = field(default_factory=dict)  # seconds per stage of the run that succeeded

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    def public(self) -> dict:
        """What GET /v1/jobs/{id} shows."""
        keys = (
            "id",
            "status",
            "stage",
            "progress",
            "attempts",
            "error",
            "timings",
            "created_at",
            "started_at",
            "finished_at",
        )
        return {key: getattr(self, key) for key in keys}


class JobConflict(ValueError):
    """An Idempotency-Key was sent again with another request body."""


@dataclass
class OwnerUsage:
    """One owner's jobs in the store."""

    active: int = 0  # queued or running
    stored: int = 0  # every stored job, ended ones included
    oldest_end: float | None = None  # finished_at of the owner's earliest-ended job (it expires first)

    def count(self, record: JobRecord) -> None:
        self.stored += 1
        if not record.ended:
            self.active += 1
        elif record.finished_at is not None:
            self.oldest_end = min(self.oldest_end or record.finished_at, record.finished_at)


@dataclass
class Sweep:
    """What one sweep of the store found and did."""

    counts: dict[str, int]  # jobs by state
    requeue: list[str]  # ids to put on the queue again (their runner was lost)
    usage: dict[str, OwnerUsage]  # jobs by owner


class JobStore:
    """Job records, requests and results under one root; every method is safe to call from any process."""

    def __init__(self, config: JobsConfig):
        self.config = config
        self.root = config.store if storage.is_remote(config.store) else str(Path(config.store).expanduser())
        self._lock = threading.Lock()  # one runner's heartbeat thread and its main thread share a record

    def _uri(self, job_id: str, name: str) -> str:
        if not JOB_ID.match(job_id):
            raise KeyError(job_id)
        return storage.join(self.root, job_id, name)

    def _read(self, job_id: str, name: str) -> bytes | None:
        fs, path = storage.filesystem(self._uri(job_id, name))
        try:
            with fs.open(path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    @staticmethod
    def new_id(idempotency_key: str | None, scope: str) -> str:
        """A random id, or one derived from (caller scope, Idempotency-Key) so that a replay finds its job."""
        if idempotency_key is None:
            return uuid.uuid4().hex
        return hashlib.sha256(f"{scope}\0{idempotency_key}".encode()).hexdigest()[:32]

    def create(
        self,
        body: bytes,
        file_format: str,
        idempotency_key: str | None = None,
        owner: str = "",
        image: bytes | None = None,
    ) -> tuple[JobRecord, bool]:
        """Store a new queued job (its request `body`, and its `image` apart: it is dropped once the job ends);
        with an Idempotency-Key the owner used before, return that job instead (created False)."""
        job_id = self.new_id(idempotency_key, owner)
        digest = hashlib.sha256(body + b"\0" + (image or b"")).hexdigest()
        existing = self.get(job_id)
        if existing is not None:
            if existing.request_sha256 != digest:
                raise JobConflict("the Idempotency-Key was used for another request body")
            return existing, False
        now = time.time()
        record = JobRecord(
            id=job_id, request_sha256=digest, file_format=file_format, created_at=now, queued_at=now, owner=owner
        )
        if image is not None:
            storage.publish_bytes(image, self._uri(job_id, "image"))
        storage.publish_bytes(body, self._uri(job_id, "request.json"))
        self.save(record)
        return record, True

    def get(self, job_id: str) -> JobRecord | None:
        data = self._read(job_id, "state.json")
        return None if data is None else JobRecord(**json.loads(data))

    def save(self, record: JobRecord) -> None:
        storage.publish_bytes(json.dumps(dataclasses.asdict(record)).encode(), self._uri(record.id, "state.json"))

    def request(self, job_id: str) -> bytes:
        data = self._read(job_id, "request.json")
        if data is None:
            raise FileNotFoundError(f"job {job_id} has no request.json under {self.root}")
        return data

    def request_image(self, job_id: str) -> bytes | None:
        """The request's image field, while the job has not ended (None without an image)."""
        return self._read(job_id, "image")

    def _drop_image(self, job_id: str) -> None:
        fs, path = storage.filesystem(self._uri(job_id, "image"))
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass

    def result(self, job_id: str, file_format: str) -> bytes | None:
        return self._read(job_id, f"result.{file_format}")

    def delete(self, job_id: str) -> None:
        fs, path = storage.filesystem(storage.join(self.root, job_id))
        if fs.exists(path):
            fs.rm(path, recursive=True)

    def ids(self) -> list[str]:
        fs, path = storage.filesystem(self.root)
        if not fs.exists(path):
            return []
        return sorted(
            name
            for name in (entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False))
            if JOB_ID.match(name)
        )

    def cancel(self, job_id: str) -> JobRecord | None:
        """Mark a job cancelled (a running one stops at its next check); an ended job stays as it is."""
        record = self.get(job_id)
        if record is None or record.ended:
            return record
        record.status, record.finished_at, record.error, record.stage = (
            "cancelled",
            time.time(),
            "cancelled by the client",
            None,
        )
        self.save(record)
        self._drop_image(job_id)
        return record

    # The runner's side: claim, report, finish. Each re-reads the stored record first, so a job cancelled or
    # handed to another run meanwhile is noticed and not overwritten.

    def claim(self, job_id: str, runner: str | None = None) -> JobRecord | None:
        """Start a run of a queued job by the replica named `runner`; None when the job is not queued (ended,
        cancelled, or running elsewhere)."""
        with self._lock:
            record = self.get(job_id)
            if record is None or record.status != "queued":
                return None
            now = time.time()
            record.status, record.attempts, record.claim = "running", record.attempts + 1, uuid.uuid4().hex
            record.runner = runner
            record.started_at = record.heartbeat_at = now
            record.stage, record.progress, record.error = None, 0.0, None
            self.save(record)
            return record

    def _still_ours(self, record: JobRecord) -> bool:
        stored = self.get(record.id)
        return stored is not None and stored.status == "running" and stored.claim == record.claim

    def report(self, record: JobRecord, stage: str | None = None, progress: float | None = None) -> bool:
        """Heartbeat (and stage/progress) of a running job; False when the run should stop (cancelled, or not ours)."""
        with self._lock:
            if not self._still_ours(record):
                return False
            record.heartbeat_at = time.time()
            if stage is not None:
                record.stage, record.progress = stage, progress
            self.save(record)
            return True

    def finish(
        self,
        record: JobRecord,
        status: str,
        error: str | None = None,
        timings: dict | None = None,
        result: bytes | None = None,
    ) -> bool:
        """End a run: result (if any) first, then the record; False when the job was cancelled or taken meanwhile."""
        with self._lock:
            if not self._still_ours(record):
                return False
            if result is not None:
                storage.publish_bytes(result, self._uri(record.id, f"result.{record.file_format}"))
            record.status, record.error, record.finished_at, record.stage = status, error, time.time(), None
            record.progress = 1.0 if status == "succeeded" else record.progress
            record.timings = timings or {}
            self.save(record)
            self._drop_image(record.id)
            return True

    def sweep(self, now: float | None = None, runner_alive: Callable[[str], bool] | None = None) -> Sweep:
        """Recover lost runs (heartbeat older than lease_s, or a runner `runner_alive` says is dead), fail stale
        queued jobs, delete expired ones."""
        now = time.time() if now is None else now
        result = Sweep(counts=dict.fromkeys(("queued", "running", *TERMINAL), 0), requeue=[], usage={})
        for job_id in self.ids():
            record = self.get(job_id)
            if record is None:  # a create caught between its two writes, or a delete in progress
                continue
            if record.ended and now - (record.finished_at or now) > self.config.ttl_s:
                self.delete(job_id)
                continue
            lost = self.lost_runner(record, now, runner_alive)
            if lost:
                if self.recover(record, lost, now):
                    result.requeue.append(record.id)
            elif record.status == "queued" and now - record.queued_at > self.config.max_queued_s:
                self._fail(record, now, f"not started within {self.config.max_queued_s:g} s")
            result.counts[record.status] += 1
            result.usage.setdefault(record.owner, OwnerUsage()).count(record)
        return result

    def lost_runner(
        self, record: JobRecord, now: float, runner_alive: Callable[[str], bool] | None = None
    ) -> str | None:
        """Why a running job's run is lost (None while it is not): its runner is dead, or its heartbeat stale."""
        if record.status != "running":
            return None
        if record.runner and runner_alive is not None and not runner_alive(record.runner):
            return "its runner replica died"
        if now - (record.heartbeat_at or 0) > self.config.lease_s:
            return f"its runner stopped reporting for {self.config.lease_s:g} s"
        return None

    def recover(self, record: JobRecord, why: str, now: float | None = None) -> bool:
        """Queue a lost run's job again (True: put it on the queue) or, after max_attempts, fail it."""
        now = time.time() if now is None else now
        if record.attempts >= self.config.max_attempts:
            self._fail(record, now, f"its worker was lost on each of {record.attempts} attempts ({why})")
            return False
        error = f"attempt {record.attempts} was lost during {record.stage or 'its start'}: {why}; queued again"
        logger.warning("job %s: %s", record.id, error)
        record.status, record.claim, record.runner, record.stage = "queued", None, None, None
        record.queued_at, record.error = now, error
        self.save(record)
        return True

    def _fail(self, record: JobRecord, now: float, error: str) -> None:
        logger.warning("job %s failed: %s", record.id, error)
        record.status, record.claim, record.stage, record.error, record.finished_at = "failed", None, None, error, now
        self.save(record)
        self._drop_image(record.id)
