"""Serving benchmark: a bounded load test through HTTP, autoscaling replica counts, and Serve's overhead.

Starts a local Ray, writes tiny-preset artifacts (or uses --export/--trellis), `serve run`s the shipped
serve/config.yaml on a free 127.0.0.1 port, then:
  1. latency of the three stages called directly in this process vs one request through HTTP (ratio);
  2. --requests requests at --concurrency to /v1/generate: p50/p95/p99, throughput, errors;
  3. running replicas per deployment before, at the peak of, and after the load (after --cooldown-s).
One JSON line per figure.
"""

import argparse
import json
import socket
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import ray
import yaml
from ray import serve

from gap3d.build import build_aligner
from gap3d.config import load_config
from gap3d.export import save_export
from gap3d.generation import TextTo3D
from gap3d.tiny.trellis import write_tiny_trellis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def emit(figure: str, value, unit: str, **extra) -> None:
    print(json.dumps({"benchmark": "serve_load", "figure": figure, "value": value, "unit": unit, **extra}), flush=True)


def tiny_artifacts(root: Path) -> tuple[str, str]:
    config = load_config("tiny")
    save_export(root / "export", build_aligner(config, seed=0).state_dict(), None, config, step=0)
    write_tiny_trellis(root / "trellis", cond_dim=config.aligner.token_dim)
    return str(root / "export"), str(root / "trellis")


def running_replicas() -> dict[str, int]:
    deployments = serve.status().applications["gap3d"].deployments
    return {name: status.replica_states.get("RUNNING", 0) for name, status in deployments.items()}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--time-limit-s", type=float, default=900, help="stop sending after this long")
    parser.add_argument("--cooldown-s", type=float, default=60, help="wait this long after the load before counting replicas")
    parser.add_argument("--direct-repeats", type=int, default=5)
    parser.add_argument("--export", default=None)
    parser.add_argument("--trellis", default=None)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="gap3d-serve-load-"))
    export, trellis = (args.export, args.trellis) if args.export else tiny_artifacts(workdir)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    config = yaml.safe_load(open("serve/config.yaml"))
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config["applications"][0]["args"].update(export=export, trellis=trellis)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    subprocess.run(["serve", "run", str(workdir / "config.yaml"), "--address", ray.get_runtime_context().gcs_address, "--non-blocking"], check=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while httpx.get(f"{base}/healthz", timeout=10).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("service not healthy after 300 s")
            time.sleep(1)
        body = {"prompt": "a small red cone on the left", "seed": 0}
        direct = TextTo3D.load(export, trellis, decoder_stages=config["applications"][0]["args"].get("decoder_stages", "auto"))
        flow = direct.export.config.flow
        direct_times, http_times = [], []
        for _ in range(args.direct_repeats):
            start = time.perf_counter()
            direct.generate(body["prompt"], None, 0, flow.sample_steps, flow.cfg_scale, "glb", config["applications"][0]["args"]["limits"]["target_faces"])
            direct_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            httpx.post(f"{base}/v1/generate", json=body, timeout=300).raise_for_status()
            http_times.append(time.perf_counter() - start)
        del direct
        emit("direct_latency_median", round(statistics.median(direct_times), 4), "s")
        emit("http_latency_median", round(statistics.median(http_times), 4), "s")
        emit("serve_overhead_ratio", round(statistics.median(http_times) / statistics.median(direct_times), 3), "x")

        before = running_replicas()
        peak = dict(before)
        stop_at = time.monotonic() + args.time_limit_s

        def one(index: int):
            if time.monotonic() > stop_at:
                return None, "skipped"
            start = time.perf_counter()
            try:
                response = httpx.post(f"{base}/v1/generate", json={"prompt": f"a red cone {index}", "seed": index}, timeout=300)
                return time.perf_counter() - start, response.status_code
            except httpx.HTTPError as error:
                return time.perf_counter() - start, type(error).__name__

        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            futures = [pool.submit(one, i) for i in range(args.requests)]
            while not all(f.done() for f in futures):
                peak = {name: max(peak.get(name, 0), count) for name, count in running_replicas().items()}
                time.sleep(1)
        wall = time.perf_counter() - start
        results = [f.result() for f in futures]
        ok = [latency for latency, status in results if status == 200]
        errors = sum(1 for _, status in results if status not in (200, "skipped"))
        context = dict(requests=args.requests, concurrency=args.concurrency)
        for q in (0.5, 0.95, 0.99):
            emit(f"latency_p{int(q * 100)}", round(percentile(ok, q), 4) if ok else None, "s", **context)
        emit("throughput", round(len(ok) / wall, 3), "requests/s", **context)
        emit("errors", errors, "requests", skipped=sum(1 for _, s in results if s == "skipped"), **context)
        time.sleep(args.cooldown_s)
        emit("replicas", {"before": before, "peak": peak, "after": running_replicas()}, "running replicas", cooldown_s=args.cooldown_s)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
