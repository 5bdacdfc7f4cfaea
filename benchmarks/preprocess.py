"""Preprocessing throughput: the Ray Data pipeline against a plain single-process loop, plus bytes per sample.

    python benchmarks/preprocess.py [--num 12288] [--shard-size 256] [--repeats 3] [--preset tiny] [key.sub=value ...]

Both sides decode and encode the same input with the same gap3d.data.encode code: img2dataset-layout shards
(miniature.img2dataset) of 640x480 photo-like JPEGs, which every sample decodes and resizes as a real crawl's
would. The Ray side runs streaming mode (no writes) and the full preprocessing job (writes Parquet to a local
directory). Ray's end-to-end times include starting the encoder actors, as a job's would, and are set against a
plain loop that loads its encoders each run. Ray's steady state is timed from the arrival of a quarter of the
rows to the last (rows encoded while the actors started do not count) and set against a plain loop whose
encoders are loaded. Prints one JSON line per figure (medians over repeats), then the storage arithmetic:
bytes per sample measured on the tiny files and computed for the paper shapes.
"""

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from gap3d.data.encode import FeatureEncoder, decode_chunks
from gap3d.data.shards import list_shards
from miniature.img2dataset import Download, photo_like_jpeg, write_img2dataset_shard
from ray_jobs.config import add_config_arguments, job_config_from_args
from ray_jobs.pipeline import ENCODE_SECTION, stream_features
from ray_jobs.preprocess import run_preprocess

# Paper shapes: DINOv2 ViT-L/14-reg at 518 px; Qwen2.5-VL-3B text model (36 layers, 2 KV heads of 128) and s = 64.
PAPER_DINO = (1374, 1024)
PAPER_CACHE_PER_TOKEN = (36, 2, 2, 128)
PAPER_SOFT_LATENTS = (64, 2048)
FP16_BYTES = 2


IMAGE_POOL = 32  # distinct JPEGs, reused under distinct keys so that writing the input stays quick
STEADY_FROM = 0.25  # steady state is timed from the arrival of this share of the rows to the last
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("cube", "sphere", "cone", "cylinder", "torus")


def write_input(raw: str, num: int, shard_size: int) -> None:
    """img2dataset-layout shards of `num` photo-like JPEGs with short shape captions."""
    rng = np.random.default_rng(0)
    pool = [photo_like_jpeg(rng) for _ in range(IMAGE_POOL)]
    for shard, start in enumerate(range(0, num, shard_size)):
        downloads = [
            Download(
                f"a {COLOURS[i % len(COLOURS)]} {SHAPES[i % len(SHAPES)]} on a table {i}",
                pool[i % IMAGE_POOL],
                640,
                480,
            )
            for i in range(start, min(start + shard_size, num))
        ]
        write_img2dataset_shard(raw, shard, downloads)


def emit(**figure) -> None:
    print(json.dumps(figure), flush=True)


def plain_loop(config, encode, raw: str, encoder: FeatureEncoder | None = None) -> int:
    """Decode and encode every shard in this process (loading the encoders unless given); returns rows encoded."""
    encoder = encoder or FeatureEncoder(config)
    rows = 0
    for shard in list_shards(raw):
        for chunk in decode_chunks(shard, config.dino.image_size, config.data.min_image_side, encode.chunk_size):
            rows += sum(table.num_rows for table, _ in encoder.encode_chunk(chunk, encode.encode_batch_size))
    return rows


def ray_stream(config, encode, raw: str) -> tuple[int, float, float, float]:
    """Stream every encoded row -> (rows, total seconds, seconds to the first batch, steady rows/s).

    Steady state is the rate from the arrival of the first STEADY_FROM share of the rows to the last: rows encoded
    while the actors started (and queued behind the first batch) do not count, nor the ramp itself.
    """
    start = time.perf_counter()
    arrivals = []  # (seconds since start, rows so far)
    rows = 0
    for batch in stream_features(config, encode, raw).iter_batches(batch_format="pyarrow", batch_size=None):
        rows += batch.num_rows
        arrivals.append((time.perf_counter() - start, rows))
    total = arrivals[-1][0]
    mark_s, mark_rows = next((t, n) for t, n in arrivals if n >= STEADY_FROM * rows)
    steady = (rows - mark_rows) / (total - mark_s) if total > mark_s else float("nan")
    return rows, total, arrivals[0][0], steady


def stream_figures(config, encode, raw: str, repeats: int, plain: float, plain_steady: float, common: dict) -> None:
    """End-to-end rows/s, start-up (first batch) and steady-state rows/s, medians over repeats.

    End to end is compared with the plain loop that loads its encoders, steady state with one that has them loaded.
    """
    runs = [ray_stream(config, encode, raw) for _ in range(repeats)]
    rows = runs[0][0]
    end_to_end = statistics.median(r / total for r, total, _, _ in runs)
    steady = statistics.median(rate for _, _, _, rate in runs)
    startup = statistics.median(first_s for _, _, first_s, _ in runs)
    emit(
        figure="ray_stream_rows_per_s",
        value=round(end_to_end, 2),
        rows=rows,
        ratio_to_plain_loop=round(end_to_end / plain, 3),
        **common,
    )
    emit(figure="ray_stream_first_batch_s", value=round(startup, 2), **common)
    emit(
        figure="ray_stream_steady_rows_per_s",
        value=round(steady, 2),
        ratio_to_plain_loop_steady=round(steady / plain_steady, 3),
        steady_from=STEADY_FROM,
        **common,
    )


def ray_preprocess(config, encode, raw: str, scratch: Path) -> int:
    output = scratch / f"features-{time.monotonic_ns()}"
    rows = run_preprocess(config, encode, raw, str(output))["rows_written"]
    shutil.rmtree(output)
    return rows


def timed_rows_per_s(run, repeats: int) -> tuple[float, int]:
    """Median rows/s of `run()` over repeats, and its row count."""
    rates, rows = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        rows = run()
        rates.append(rows / (time.perf_counter() - start))
    return statistics.median(rates), rows


def storage_figures(config, encode, raw: str, scratch: Path, prompt_tokens: int) -> None:
    """Bytes per sample on the tiny files, and the paper-shape arithmetic."""
    output = scratch / "storage"
    summary = run_preprocess(config, encode, raw, str(output))
    on_disk = sum(path.stat().st_size for path in output.glob("*.parquet"))
    emit(figure="feature_bytes_per_sample", preset=config.preset, bytes=round(on_disk / summary["rows_written"]))
    dino = PAPER_DINO[0] * PAPER_DINO[1] * FP16_BYTES
    layers, two, kv_heads, head_dim = PAPER_CACHE_PER_TOKEN
    cache = layers * two * kv_heads * head_dim * prompt_tokens * FP16_BYTES
    latents = PAPER_SOFT_LATENTS[0] * PAPER_SOFT_LATENTS[1] * FP16_BYTES
    for mode, extra in (("prompt_cache", cache), ("soft_latents", latents)):
        total = dino + extra
        emit(
            figure="paper_bytes_per_sample",
            mode=mode,
            prompt_tokens=prompt_tokens,
            dino_bytes=dino,
            vlm_bytes=extra,
            total_bytes=total,
            tb_per_million_pairs=round(total * 1e6 / 1e12, 2),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--num",
        type=int,
        default=12288,
        help="input samples (enough that the rows decoded while the actors start are a small share)",
    )
    parser.add_argument("--shard-size", type=int, default=256, help="samples per input shard")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (medians reported)")
    parser.add_argument(
        "--pools",
        type=lambda text: [int(v) for v in text.split(",")],
        default=[1, 2],
        help="encoder actor counts to stream with",
    )
    parser.add_argument("--prompt-tokens", type=int, default=60, help="prompt length for the paper cache arithmetic")
    add_config_arguments(parser)
    args = parser.parse_args()
    config, sections = job_config_from_args(args, ENCODE_SECTION)
    encode = sections["encode"]
    ray.init(log_to_driver=False)
    scratch = Path(tempfile.mkdtemp(prefix="gap3d-bench-preprocess-"))
    try:
        raw = str(scratch / "raw")
        write_input(raw, args.num, args.shard_size)
        common = {"preset": config.preset, "samples": args.num, "shard_size": args.shard_size}
        plain, rows = timed_rows_per_s(lambda: plain_loop(config, encode, raw), args.repeats)
        emit(
            figure="plain_loop_rows_per_s",
            value=round(plain, 2),
            rows=rows,
            torch_threads=torch.get_num_threads(),
            **common,
        )
        encoder = FeatureEncoder(config)
        plain_steady, _ = timed_rows_per_s(lambda: plain_loop(config, encode, raw, encoder), args.repeats)
        emit(
            figure="plain_loop_steady_rows_per_s",
            value=round(plain_steady, 2),
            rows=rows,
            torch_threads=torch.get_num_threads(),
            **common,
        )
        for pool in args.pools:
            pooled = dataclasses.replace(encode, pool_min=pool, pool_max=pool)
            stream_figures(config, pooled, raw, args.repeats, plain, plain_steady, {**common, "encoder_actors": pool})
        rate, rows = timed_rows_per_s(lambda: ray_preprocess(config, encode, raw, scratch), args.repeats)
        emit(
            figure="ray_preprocess_rows_per_s",
            value=round(rate, 2),
            rows=rows,
            ratio_to_plain_loop=round(rate / plain, 3),
            encoder_actors=encode.pool_max,
            **common,
        )
        storage_figures(config, encode, raw, scratch, args.prompt_tokens)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
