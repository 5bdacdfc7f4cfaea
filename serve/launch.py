"""`serve run` of serve/config.yaml on this machine with other artifacts, port, broker or job store.

The demo, the tests and benchmarks/serve_load.py all start the shipped config through here, so each runs the
deployments, limits and autoscaling a user gets, changed only where it says so.
"""

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

SHIPPED_CONFIG = Path(__file__).resolve().parent / "config.yaml"
SHIPPED_GPU_CONFIG = SHIPPED_CONFIG.with_name("config.gpu.yaml")


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_config(
    port: int,
    artifacts: dict,
    jobs: dict | None = None,
    limits: dict | None = None,
    args: dict | None = None,
    shipped: Path = SHIPPED_CONFIG,
) -> dict:
    """The `shipped` config on 127.0.0.1:`port` with `artifacts` ({export, trellis}); `jobs` updates the jobs section
    (its broker also reaches the JobRunner's autoscaling policy), or None removes the async jobs (and the JobRunner)."""
    config = yaml.safe_load(shipped.read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    application = config["applications"][0]
    application["args"].update(artifacts, **(args or {}))
    application["args"]["limits"].update(limits or {})
    runner = next(d for d in application["deployments"] if d["name"] == "JobRunnerDeployment")
    if jobs is None:
        application["args"]["jobs"] = None
        application["deployments"].remove(runner)
    else:
        application["args"]["jobs"].update(jobs)
        runner["autoscaling_config"]["policy"]["policy_kwargs"]["broker_url"] = application["args"]["jobs"]["broker"]
    return config


def wait_until_ready(base: str, timeout_s: float) -> None:
    """Poll GET /readyz until it answers 200 and lists a running replica for every deployment (the JobRunner's
    included, which readiness itself does not need)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{base}/readyz", timeout=5)
            deployments = response.json()["deployments"].values() if response.status_code == 200 else []
            if deployments and all(view["running_replicas"] > 0 for view in deployments):
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(1)
    raise TimeoutError(f"the service at {base} was not ready within {timeout_s} s")


def serve_run(config: dict, path: Path, address: str, timeout_s: float = 600) -> str:
    """Write `config` to `path`, `serve run --non-blocking` it against the cluster at `address`; the base URL once
    ready."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    # The `serve` CLI of this interpreter's Ray, whether or not its virtualenv is on PATH.
    subprocess.run(
        [sys.executable, "-m", "ray.serve.scripts", "run", str(path), "--address", address, "--non-blocking"],
        check=True,
        timeout=timeout_s,
        capture_output=True,
    )
    base = f"http://127.0.0.1:{config['http_options']['port']}"
    wait_until_ready(base, timeout_s)
    return base
