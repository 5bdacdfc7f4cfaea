"""Serving benchmark over HTTP on the shipped serve/config.yaml (tiny preset by default, synchronous routes).

Starts a local Ray (with --throughput-optimized: Ray Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED=1), `serve run`s the
shipped config on a free 127.0.0.1 port, then:
  1. one prompt through HTTP against the same three stages called in this process, at the replicas' thread
     count (1: Ray gives fractional-CPU replicas OMP_NUM_THREADS=1) and at this process's: medians, the ratio,
     and where the difference goes (each stage as the Gateway saw it, and the rest: proxy, ingress, transfers);
  2. /v1/generate at each --concurrency: p50/p95 of the 200s, throughput, share of 503s, client time-outs and
     other errors (the last two must be 0), requests admitted but cancelled at the deadline (wasted work), and the
     running replicas at the end;
  3. /v1/embed throughput at concurrency 8 over 1: the Aligner's batching gain.
With --hostile instead: what hostile or careless clients cost (issue 29): /healthz, /readyz and a generation
while --stalled connections hold a stalled upload each; the answer to a body that stops short of its
Content-Length; a 200 MB chunked body (bytes sent before the answer, Gateway and proxy memory growth); and how
soon /readyz answers 503 once a stage's replicas are killed. Serve's proxies cut long bodies
(serve/proxy_guard.py) unless --no-proxy-cutoff.
Every request loop is bounded in count and time. One JSON line per figure.
"""

import argparse
import json
import os
import select
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
import torch

from gap3d.build import build_aligner, derive_shapes
from gap3d.config import load_config
from gap3d.export import save_export
from gap3d.generation import TextTo3D, align
from gap3d.trellis import export_mesh
from miniature.checkpoints.trellis import write_tiny_trellis
from serve.api import stage_timings
from serve.launch import free_port, local_config, serve_run
from serve.proxy_guard import CALLBACK, CALLBACK_ENV

# Seed 5: the random tiny aligner and stage-1 TRELLIS decode some hundreds of faces from it (seed 3, used before the
# decoder's noise got a seed stream of its own, now decodes an empty structure).
PROMPT = {"prompt": "a small red cone", "seed": 5}


def emit(figure: str, value, unit: str, **extra) -> None:
    print(json.dumps({"benchmark": "serve_load", "figure": figure, "value": value, "unit": unit, **extra}), flush=True)


def tiny_artifacts(root: Path) -> dict:
    config = derive_shapes(load_config("tiny"))
    aligner = build_aligner(config, seed=0)
    torch.nn.init.normal_(aligner.final_layer.linear.weight, std=0.05)  # a non-trivial velocity field, as in the tests
    save_export(root / "export", aligner.state_dict(), None, config, step=0)
    write_tiny_trellis(root / "trellis", cond_dim=config.aligner.token_dim, stage2=False)
    return {"export": str(root / "export"), "trellis": str(root / "trellis")}


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 4) if ordered else None


def in_process_seconds(direct: TextTo3D, target_faces: int, threads: int) -> dict:
    """One prompt through the three stages in this process with `threads` torch threads: seconds per stage and total."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        flow, times = direct.export.config.flow, {}
        start = time.perf_counter()
        cond = direct.prompt_encoder([PROMPT["prompt"]])
        times["prompt_encoder"] = time.perf_counter() - start
        tokens = align(direct.export, cond, [PROMPT["seed"]], flow.sample_steps, flow.cfg_scale)
        times["aligner"] = time.perf_counter() - start - times["prompt_encoder"]
        mesh = direct.decoder.generate(tokens, seed=PROMPT["seed"])[0]
        export_mesh(mesh, "glb", target_faces)
        times["total"] = time.perf_counter() - start
        times["decoder"] = times["total"] - times["prompt_encoder"] - times["aligner"]
        return times
    finally:
        torch.set_num_threads(saved)


def http_seconds(base: str) -> dict:
    start = time.perf_counter()
    response = httpx.post(f"{base}/v1/generate", json=PROMPT, timeout=120)
    total = time.perf_counter() - start
    response.raise_for_status()
    stages = stage_timings(response.headers)
    return {**stages, "total": total, "rest": total - sum(stages.values())}


def compare_with_in_process(base: str, direct: TextTo3D, target_faces: int, repeats: int) -> None:
    runs = {"http": [], "in_process_1_thread": [], f"in_process_{torch.get_num_threads()}_threads": []}
    for _ in range(repeats):
        runs["http"].append(http_seconds(base))
        runs["in_process_1_thread"].append(in_process_seconds(direct, target_faces, 1))
        runs[f"in_process_{torch.get_num_threads()}_threads"].append(
            in_process_seconds(direct, target_faces, torch.get_num_threads())
        )
    medians = {
        name: {key: round(statistics.median(r[key] for r in rows), 4) for key in rows[0]} for name, rows in runs.items()
    }
    for name, values in medians.items():
        emit(f"{name}_latency_median", values["total"], "s", stages=values, repeats=repeats)
    emit(
        "http_over_in_process_ratio",
        round(medians["http"]["total"] / medians["in_process_1_thread"]["total"], 3),
        "x",
        note="same thread count per stage (1)",
    )


def load_phase(
    base: str, route: str, concurrency: int, requests: int, time_limit_s: float, client_timeout_s: float
) -> dict:
    """`requests` requests at `concurrency` (stopping early after `time_limit_s`): latencies and outcomes."""
    stop_at = time.monotonic() + time_limit_s

    def one(_):
        if time.monotonic() > stop_at:
            return None, "skipped", None
        start = time.perf_counter()
        try:
            response = httpx.post(f"{base}{route}", json=PROMPT, timeout=client_timeout_s)
            return time.perf_counter() - start, response.status_code, response.headers.get("x-aligner-batch-size")
        except httpx.TimeoutException:
            return time.perf_counter() - start, "client_timeout", None
        except httpx.HTTPError as error:
            return time.perf_counter() - start, type(error).__name__, None

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    sent = [r for r in results if r[1] != "skipped"]
    ok = [latency for latency, status, _ in sent if status == 200]
    return {
        "sent": len(sent),
        "ok": len(ok),
        "wall_s": round(wall, 2),
        "p50_s": percentile(ok, 0.5),
        "p95_s": percentile(ok, 0.95),
        "throughput_rps": round(len(ok) / wall, 3),
        "share_503": round(sum(1 for r in sent if r[1] == 503) / max(len(sent), 1), 3),
        "client_timeouts": sum(1 for r in sent if r[1] == "client_timeout"),
        "errors": sum(1 for r in sent if r[1] not in (200, 503, "client_timeout")),
        "mean_batch": round(
            statistics.mean(int(b) for _, status, b in sent if status == 200 and b)
            if ok and route == "/v1/embed"
            else 0,
            2,
        ),
    }


def cancelled_by_deadline(base: str) -> float:
    """The Gateway's count of stage calls abandoned at the deadline (work admitted, then wasted)."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    prefix = 'gap3d_requests_cancelled_total{reason="deadline"} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def running_replicas() -> dict[str, int]:
    from ray import serve

    deployments = serve.status().applications["gap3d"].deployments
    return {name: status.replica_states.get("RUNNING", 0) for name, status in deployments.items()}


def connect(base: str) -> socket.socket:
    parts = urlsplit(base)
    return socket.create_connection((parts.hostname, parts.port), timeout=30)


def head(path: str, **headers) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: gap3d", "Content-Type: application/json"]
    return ("\r\n".join(lines + [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]) + "\r\n\r\n").encode()


def status_line(connection: socket.socket, timeout_s: float) -> str:
    connection.settimeout(timeout_s)
    try:
        return connection.recv(4096).split(b"\r\n", 1)[0].decode() or "closed"
    except TimeoutError:
        return "no answer"
    except OSError as error:
        return type(error).__name__


def timed_get(base: str, path: str) -> tuple[int | str, float]:
    start = time.perf_counter()
    try:
        return httpx.get(f"{base}{path}", timeout=15).status_code, round(time.perf_counter() - start, 3)
    except httpx.HTTPError as error:
        return type(error).__name__, round(time.perf_counter() - start, 3)


def probes_under_stalled_uploads(base: str, count: int) -> dict:
    """Probes and one generation while `count` connections each hold headers and 5 bytes of a 100-byte body."""
    connections = []
    try:
        for _ in range(count):
            connections.append(connect(base))
            connections[-1].sendall(head("/v1/generate", Content_Length=100) + b'{"pro')
        time.sleep(1)
        probes = {path: [timed_get(base, path) for _ in range(3)] for path in ("/healthz", "/readyz")}
        start = time.perf_counter()
        try:
            generation = httpx.post(f"{base}/v1/generate", json=PROMPT, timeout=30).status_code
        except httpx.HTTPError as error:
            generation = type(error).__name__
        return {"probes": probes, "generation": generation, "generation_s": round(time.perf_counter() - start, 3)}
    finally:
        for connection in connections:
            connection.close()


def large_image_prompt(side: int = 4096) -> str:
    """A base64 JPEG of noise, `side` pixels square: seconds of decoding, within the upload limit."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=75)
    return base64.b64encode(buffer.getvalue()).decode()


def probes_under_image_decoding(base: str, count: int = 6) -> dict:
    """/healthz's slowest answer while `count` prompts with a 4096x4096 image are in flight."""
    body = {**PROMPT, "image": large_image_prompt()}
    with ThreadPoolExecutor(count) as pool:
        posts = [pool.submit(httpx.post, f"{base}/v1/generate", json=body, timeout=120) for _ in range(count)]
        latencies = []
        while not all(post.done() for post in posts):
            latencies.append(timed_get(base, "/healthz")[1])
            time.sleep(0.05)
        statuses = sorted(post.result().status_code for post in posts)
    return {"healthz_max_s": max(latencies, default=None), "healthz_probes": len(latencies), "statuses": statuses}


def short_body_answer(base: str) -> dict:
    """A body that stops at 30 of its declared 1000 bytes: the answer, and how long it took."""
    with connect(base) as connection:
        connection.sendall(head("/v1/embed", Content_Length=1000) + b"x" * 30)
        start = time.perf_counter()
        answer = status_line(connection, timeout_s=45)
        return {"answer": answer, "after_s": round(time.perf_counter() - start, 2)}


def process_of(actor) -> psutil.Process:
    import ray

    return psutil.Process(ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=30))


def serve_actor(name_part: str):
    import ray

    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if name_part in a["name"]]
    return ray.get_actor(name, namespace="serve")


def private_mb(process: psutil.Process) -> float:
    memory = process.memory_info()
    return (memory.rss - memory.shared) / 2**20


def chunked_upload(base: str, total_mb: int, chunk_kb: int = 1024) -> dict:
    """A chunked body of `total_mb`, sent as curl does (looking for an answer between chunks), while the
    Gateway's and the proxy's private memory is sampled."""
    processes = {"gateway": process_of(serve_actor("#GatewayDeployment#")), "proxy": process_of(serve_actor("PROXY"))}
    start = {name: private_mb(process) for name, process in processes.items()}
    peak, done = dict(start), threading.Event()

    def sample():
        while not done.wait(0.01):
            for name, process in processes.items():
                peak[name] = max(peak[name], private_mb(process))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    frame = f"{chunk_kb * 1024:x}\r\n".encode() + b"x" * (chunk_kb * 1024) + b"\r\n"
    sent = 0
    with connect(base) as connection:
        connection.sendall(head("/v1/generate", Transfer_Encoding="chunked"))
        try:
            while sent < total_mb * 2**20 and not select.select([connection], [], [], 0)[0]:
                connection.sendall(frame)
                sent += chunk_kb * 1024
        except OSError:
            pass
        answer = status_line(connection, timeout_s=60)
    done.set()
    sampler.join()
    return {
        "answer": answer,
        "sent_mb_before_answer": round(sent / 2**20, 1),
        "growth_mb": {name: round(peak[name] - start[name]) for name in processes},
    }


def readiness_lag(base: str, deployment: str) -> dict:
    """Kill every replica of `deployment`: seconds until /readyz answers 503, then until it answers 200 again."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"#{deployment}#" in a["name"]]
    start = time.monotonic()
    for name in names:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    lag, back = None, None
    while time.monotonic() - start < 120 and back is None:
        code = httpx.get(f"{base}/readyz", timeout=10).status_code
        if lag is None and code == 503:
            lag = round(time.monotonic() - start, 2)
        elif lag is not None and code == 200:
            back = round(time.monotonic() - start, 1)
        time.sleep(0.05)
    return {"to_503_s": lag, "back_to_200_s": back}


def hostile_phase(base: str, stalled: int, mode: str) -> None:
    emit("probes_under_stalled_uploads", probes_under_stalled_uploads(base, stalled), "s", stalled=stalled, mode=mode)
    emit("short_body_answer", short_body_answer(base), "s", mode=mode)
    emit("probes_under_image_decoding", probes_under_image_decoding(base), "s", images=6, mode=mode)
    for run in range(3):
        emit("chunked_200mb_upload", chunked_upload(base, 200), "mixed", run=run, mode=mode)
    for deployment in ("DecoderDeployment", "AlignerDeployment", "PromptEncoderDeployment"):
        emit("readiness_after_replica_loss", readiness_lag(base, deployment), "s", deployment=deployment, mode=mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,8,100", help="comma-separated concurrency levels for /v1/generate")
    parser.add_argument(
        "--requests-per-level", type=int, default=0, help="requests per level (default: max(24, 3 x concurrency))"
    )
    parser.add_argument("--time-limit-s", type=float, default=300, help="stop sending at a level after this long")
    parser.add_argument("--repeats", type=int, default=7, help="repeats of the HTTP vs in-process comparison")
    parser.add_argument("--embed-requests", type=int, default=96)
    parser.add_argument(
        "--throughput-optimized", action="store_true", help="start Ray with RAY_SERVE_THROUGHPUT_OPTIMIZED=1"
    )
    parser.add_argument("--hostile", action="store_true", help="measure hostile clients instead of load (see above)")
    parser.add_argument("--stalled", type=int, default=600, help="stalled uploads held open in --hostile")
    parser.add_argument(
        "--no-proxy-cutoff", action="store_true", help="leave Serve's proxy reading whole bodies (serve/proxy_guard.py)"
    )
    parser.add_argument("--export", default=None)
    parser.add_argument("--trellis", default=None)
    args = parser.parse_args()

    if args.throughput_optimized:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"  # read by Serve's processes, which inherit this environment
    if not args.no_proxy_cutoff:
        os.environ[CALLBACK_ENV] = CALLBACK
    import ray
    from ray import serve

    workdir = Path(tempfile.mkdtemp(prefix="gap3d-serve-load-"))
    artifacts = {"export": args.export, "trellis": args.trellis} if args.export else tiny_artifacts(workdir)
    mode = "throughput_optimized" if args.throughput_optimized else "default"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        # The random tiny artifacts have stage 1 only; given artifacts are served as serve/config.yaml says.
        stages = None if args.export else {"decoder_stages": "coarse"}
        config = local_config(free_port(), artifacts, jobs=None, args=stages)
        app_args = config["applications"][0]["args"]
        base = serve_run(config, workdir / "config.yaml", ray.get_runtime_context().gcs_address)
        if args.hostile:
            httpx.post(f"{base}/v1/generate", json=PROMPT, timeout=120).raise_for_status()
            hostile_phase(base, args.stalled, "gateway_only" if args.no_proxy_cutoff else "proxy_cutoff")
            return
        direct = TextTo3D.load(artifacts["export"], artifacts["trellis"], decoder_stages=app_args["decoder_stages"])
        httpx.post(f"{base}/v1/generate", json=PROMPT, timeout=120).raise_for_status()  # warm every stage once
        compare_with_in_process(base, direct, app_args["limits"]["target_faces"], args.repeats)
        del direct
        client_timeout_s = app_args["limits"]["deadline_s"] + 30
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            requests = args.requests_per_level or max(24, 3 * concurrency)
            before = cancelled_by_deadline(base)
            figures = load_phase(base, "/v1/generate", concurrency, requests, args.time_limit_s, client_timeout_s)
            figures["cancelled_at_deadline"] = int(cancelled_by_deadline(base) - before)
            emit(
                "generate_load",
                figures,
                "mixed",
                concurrency=concurrency,
                mode=mode,
                deadline_s=app_args["limits"]["deadline_s"],
                replicas_after=running_replicas(),
            )
        embeds = {
            c: load_phase(base, "/v1/embed", c, args.embed_requests, args.time_limit_s, client_timeout_s)
            for c in (1, 8)
        }
        emit(
            "embed_throughput",
            {c: embeds[c]["throughput_rps"] for c in embeds},
            "requests/s",
            mean_batch_at_8=embeds[8]["mean_batch"],
            mode=mode,
        )
        emit(
            "aligner_batching_gain", round(embeds[8]["throughput_rps"] / embeds[1]["throughput_rps"], 3), "x", mode=mode
        )
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
