"""Peak memory of the preprocessing job against input-shard size: process-tree peak RSS per shard size.

    python benchmarks/preprocess_memory.py [--sizes 500,2000,10000] [--tar-glob] [--timeout 1800] [key.sub=value ...]

Per size N, writes one img2dataset-layout shard of N samples (640x480 JPEGs of about 45 KB, reused from a pool of
32 under distinct keys and captions; miniature.img2dataset) and runs the job exactly as users do, as a subprocess:

    python ray_jobs/preprocess.py --input DIR --output DIR --preset tiny dino.image_size=518 [overrides]

The job starts its own local Ray cluster, so its GCS, raylet and workers are descendants of the job process. A
thread sums the RSS of the job process and all its descendants every 0.1 s and keeps the peak. RSS counts every
resident page of a process, shared ones included: a page of shared memory, such as Ray's object store, is counted
once per process that touched it. That sum is what "process-tree peak RSS" means here. Each run is bounded by
--timeout (the tree is killed past it); afterwards any process of the tree still running is killed and reported.
An unmeasured 32-sample run goes first, so one-off work (building the tiny checkpoints on first use) lands in
no figure. `--tar-glob` passes the job `DIR/*.tar` instead of the directory, for listing code that takes the
metadata .parquet beside each tar for a second shard.

Prints one JSON line per size (figure preprocess_peak_rss_mib), then preprocess_peak_rss_ratio: the peak of the
largest size over that of the smallest. Goal: at most 1.25 for 10,000 against 500 samples, i.e. memory bounded
by the decode chunk (`encode.chunk_size`, 64 by default), not by the shard.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from miniature.img2dataset import Download, photo_like_jpeg, write_img2dataset_shard

REPO = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 518  # the paper's DINOv2 input side
# The tiny preset's aligner expects the tiny 112 px grid; the job refuses encoders whose grid differs (gap3d/build.py).
IMAGE_OVERRIDES = (f"dino.image_size={IMAGE_SIZE}", f"aligner.grid_size={IMAGE_SIZE // 14}")
SOURCE_WIDTH, SOURCE_HEIGHT = 640, 480  # larger than IMAGE_SIZE, so the job resizes every image
POOL_SIZE = 32
WARMUP_SAMPLES = 32
SAMPLE_INTERVAL_S = 0.1
EXIT_GRACE_S = 15.0  # how long Ray's own shutdown may take before a surviving process counts as leaked
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("cube", "sphere", "cone", "cylinder", "torus")
MIB = 2**20


def emit(**figure) -> None:
    print(json.dumps(figure), flush=True)


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_shard(directory: Path, samples: int, pool: list[bytes]) -> None:
    """One img2dataset shard of `samples` pool images under distinct keys and captions."""
    downloads = (
        Download(
            f"a {COLOURS[i % len(COLOURS)]} {SHAPES[i % len(SHAPES)]} on a table {i}",
            pool[i % len(pool)],
            SOURCE_WIDTH,
            SOURCE_HEIGHT,
        )
        for i in range(samples)
    )
    write_img2dataset_shard(str(directory), 0, downloads)


def process_name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.NoSuchProcess:
        return "?"


def running(process: psutil.Process) -> bool:
    """Running and not a zombie (an exited process nobody has reaped yet)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class TreeSampler(threading.Thread):
    """Every SAMPLE_INTERVAL_S, sums the RSS of a process and its descendants; keeps the peaks and every process
    seen."""

    def __init__(self, root: psutil.Process):
        super().__init__(daemon=True)
        self.root = root
        self.seen = {root.pid: root}
        self.peak_total = 0
        self.peak_single = 0
        self.largest = ""
        self.stopped = threading.Event()

    def run(self) -> None:
        while True:
            self.sample()
            if self.stopped.wait(SAMPLE_INTERVAL_S):
                return

    def sample(self) -> None:
        try:
            tree = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total = 0
        for process in tree:
            self.seen.setdefault(process.pid, process)
            try:
                rss = process.memory_info().rss
            except psutil.NoSuchProcess:  # exited between listing and reading
                continue
            total += rss
            if rss > self.peak_single:
                self.peak_single, self.largest = rss, process_name(process)
        self.peak_total = max(self.peak_total, total)


def survivors(processes: list[psutil.Process], grace_s: float) -> list[psutil.Process]:
    """Those of `processes` still running after up to grace_s seconds."""
    deadline = time.monotonic() + grace_s
    while True:
        alive = [process for process in processes if running(process)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def kill(processes: list[psutil.Process]) -> list[str]:
    """SIGKILL `processes`; returns the names of those that were still there."""
    names = []
    for process in processes:
        try:
            names.append(process_name(process))
            process.kill()
        except psutil.NoSuchProcess:
            continue
    return names


def job_env() -> dict:
    """The caller's environment with the repo importable, this Python's bin first and a new local Ray cluster forced."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))
    # With RAY_ADDRESS unset, ray.init() joins a cluster someone `ray start`ed on this machine, whose processes are
    # not the job's descendants; "local" always starts the job's own.
    env["RAY_ADDRESS"] = "local"
    return env


def summary_line(stdout: Path) -> dict:
    """The job's final JSON summary (last stdout line), or {} when it printed none."""
    lines = stdout.read_text().strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return {}


def run_job(input_uri: str, output: Path, overrides: list[str], timeout_s: float, logs: Path) -> dict:
    """Run the preprocessing job as a subprocess, measuring its process tree; returns the measurements."""
    command = [
        sys.executable,
        "-m",
        "ray_jobs.preprocess",
        "--input",
        input_uri,
        "--output",
        str(output),
        "--preset",
        "tiny",
        *IMAGE_OVERRIDES,
        *overrides,
    ]
    stdout, stderr = logs.with_suffix(".stdout"), logs.with_suffix(".stderr")
    start = time.perf_counter()
    with stdout.open("w") as out, stderr.open("w") as err:
        job = subprocess.Popen(command, cwd=REPO, env=job_env(), stdout=out, stderr=err)
        sampler = TreeSampler(psutil.Process(job.pid))
        sampler.start()
        try:
            exit_code = job.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            sampler.sample()  # discover the newest descendants before killing the tree
            kill([process for process in sampler.seen.values() if running(process)])
            exit_code = job.wait()
            note(f"timed out after {timeout_s:.0f} s; killed the job's process tree")
    wall_s = time.perf_counter() - start
    sampler.stopped.set()
    sampler.join()
    leaked = kill(survivors([process for pid, process in sampler.seen.items() if pid != job.pid], EXIT_GRACE_S))
    if leaked:
        note(f"{len(leaked)} process(es) of the job's tree outlived it and were killed: {', '.join(leaked)}")
    if exit_code != 0:
        note(f"job exited {exit_code}; last lines of its stderr:\n" + "\n".join(stderr.read_text().splitlines()[-30:]))
    return {
        "value": round(sampler.peak_total / MIB, 1),
        "largest_process_mib": round(sampler.peak_single / MIB, 1),
        "largest_process": sampler.largest,
        "wall_s": round(wall_s, 1),
        "exit_code": exit_code,
        "rows_written": summary_line(stdout).get("rows_written"),
        "survivors_killed": leaked,
    }


def measure(samples: int, pool: list[bytes], args: argparse.Namespace, scratch: Path) -> dict:
    """Write an N-sample shard, run the job on it and delete both; returns the job's measurements."""
    raw, output = scratch / f"raw-{samples}", scratch / f"features-{samples}"
    write_shard(raw, samples, pool)
    input_uri = f"{raw}/*.tar" if args.tar_glob else str(raw)
    try:
        return run_job(input_uri, output, args.overrides, args.timeout, scratch / f"job-{samples}")
    finally:
        shutil.rmtree(raw, ignore_errors=True)
        shutil.rmtree(output, ignore_errors=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(v) for v in text.split(",")],
        default=[500, 2000, 10000],
        help="samples per input shard, one run each",
    )
    parser.add_argument(
        "--tar-glob", action="store_true", help="pass the job DIR/*.tar rather than the shard directory"
    )
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds per job run before its process tree is killed"
    )
    parser.add_argument(
        "overrides", nargs="*", default=[], help="config overrides passed to the job, e.g. encode.chunk_size=32"
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    rng = np.random.default_rng(0)
    pool = [photo_like_jpeg(rng, SOURCE_WIDTH, SOURCE_HEIGHT) for _ in range(POOL_SIZE)]
    scratch = Path(tempfile.mkdtemp(prefix="gap3d-bench-preprocess-memory-"))
    try:
        warmup = measure(WARMUP_SAMPLES, pool, args, scratch)
        note(f"warm-up ({WARMUP_SAMPLES} samples, unmeasured): exit {warmup['exit_code']}, {warmup['wall_s']} s")
        if warmup["exit_code"] != 0:
            return 1
        peaks = {}
        for samples in args.sizes:
            result = measure(samples, pool, args, scratch)
            emit(
                figure="preprocess_peak_rss_mib",
                samples=samples,
                image_size=IMAGE_SIZE,
                overrides=args.overrides,
                **result,
            )
            if result["exit_code"] == 0:
                peaks[samples] = result["value"]
        smallest, largest = min(args.sizes), max(args.sizes)
        ratio = round(peaks[largest] / peaks[smallest], 3) if smallest in peaks and largest in peaks else None
        emit(figure="preprocess_peak_rss_ratio", value=ratio, samples=[smallest, largest], goal=1.25)
        return 0 if len(peaks) == len(args.sizes) else 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
