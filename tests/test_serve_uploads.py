"""Hostile and careless uploads over real HTTP: stalled, oversized, chunked and abandoned bodies cannot take the
Gateway, its probes or its memory (serve/middleware.py)."""

import contextlib
import os
import select
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import psutil
import ray

from tests.serving import AUTH, BODY_STALL_S, SEED, metric, post, replicas, wait_for

MiB = 2**20


def address(base: str) -> tuple[str, int]:
    parts = urlsplit(base)
    return parts.hostname, parts.port


def request_head(path: str, **headers) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: gap3d", f"Authorization: {AUTH['Authorization']}"]
    lines += [
        "Content-Type: application/json",
        *(f"{name.replace('_', '-')}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@contextlib.contextmanager
def stalled_uploads(base: str, count: int):
    """`count` connections that each send their headers and 5 bytes of a 100-byte body, then nothing."""
    sockets = []
    try:
        for _ in range(count):
            connection = socket.create_connection(address(base), timeout=10)
            connection.sendall(request_head("/v1/generate", Content_Length=100) + b'{"pro')
            sockets.append(connection)
        yield sockets
    finally:
        for connection in sockets:
            connection.close()


def response_status(connection: socket.socket, timeout_s: float) -> int | None:
    """The status code of the response waiting on `connection` (None: the connection closed without one)."""
    connection.settimeout(timeout_s)
    head = connection.recv(4096)
    return int(head.split(b" ", 2)[1]) if head else None


def closed_by_server(connection: socket.socket, timeout_s: float) -> bool:
    connection.settimeout(timeout_s)
    try:
        while connection.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def test_600_stalled_uploads_leave_the_probes_answering_within_a_second_and_a_generation_succeeding(service):
    before = metric(service, "gap3d_requests_in_flight")
    with stalled_uploads(service, 600):
        wait_for(
            lambda: metric(service, "gap3d_requests_in_flight") >= before + 600,
            timeout_s=BODY_STALL_S / 2,
            interval_s=0.1,
            what="the 600 uploads held by the Gateway",
        )
        for path in ("/healthz", "/readyz"):
            probe = httpx.get(f"{service}{path}", timeout=10)
            assert probe.status_code == 200 and probe.elapsed.total_seconds() < 1, (path, probe.elapsed)
        generation = post(service, "/v1/generate", {"prompt": "a small red cone", "seed": SEED})
        assert generation.status_code == 200, generation.text


def test_a_stalled_body_gets_408_and_its_connection_closed(service):
    with socket.create_connection(address(service), timeout=10) as connection:
        connection.sendall(request_head("/v1/generate", Content_Length=1000) + b"x" * 30)
        started = time.monotonic()
        assert response_status(connection, timeout_s=BODY_STALL_S + 20) == 408
        assert time.monotonic() - started >= BODY_STALL_S * 0.9
        assert closed_by_server(connection, timeout_s=10)


def gateway_pid() -> int:
    (actor,) = replicas("GatewayDeployment").values()
    return ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=30)


class PeakMemory:
    """Samples a process's private resident memory (shared pages, such as Ray's object store, left out) in a
    thread; `peak` - `start` is what it grew by."""

    def __init__(self, pid: int):
        self.process, self.done = psutil.Process(pid), threading.Event()
        self.start = self.peak = self._private()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _private(self) -> int:
        memory = self.process.memory_info()
        return memory.rss - memory.shared

    def _sample(self):
        while not self.done.wait(0.01):
            self.peak = max(self.peak, self._private())

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.done.set()
        self.thread.join()


def send_chunked_until_answered(base: str, total: int, chunk: int) -> tuple[int | None, int]:
    """POST a chunked body of `total` bytes, reading between chunks as curl does; (status, bytes sent before it)."""
    frame = f"{chunk:x}\r\n".encode() + b"x" * chunk + b"\r\n"
    sent = 0
    with socket.create_connection(address(base), timeout=30) as connection:
        connection.sendall(request_head("/v1/generate", Transfer_Encoding="chunked"))
        try:
            while sent < total and not select.select([connection], [], [], 0)[0]:
                connection.sendall(frame)
                sent += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass  # the server closed the connection while this chunk was on its way: its answer came before
        try:
            return response_status(connection, timeout_s=30), sent
        except ConnectionResetError:
            return None, sent


def test_a_chunked_200_mb_body_is_refused_with_413_before_the_gateway_reads_40_mb(service):
    read_before = metric(service, "gap3d_request_body_bytes_sum")
    with PeakMemory(gateway_pid()) as memory:
        status, sent = send_chunked_until_answered(service, total=200 * MiB, chunk=MiB)
    read = metric(service, "gap3d_request_body_bytes_sum") - read_before
    assert status == 413 and sent < 200 * MiB
    assert 32 * MiB < read < 40 * MiB
    # Buffered whole (as Serve's proxy and replica do unless the proxy cuts the body), the body alone would take
    # 200 MB of the Gateway.
    assert memory.peak - memory.start < 100 * MiB, (memory.peak - memory.start) / MiB


def generate_counts(service) -> dict[str, float]:
    """{status: requests counted} of /v1/generate in the Gateway's /metrics."""
    text = httpx.get(f"{service}/metrics", headers=AUTH, timeout=30).text
    prefix = 'gap3d_requests_total{route="/v1/generate",status="'
    return {
        line[len(prefix) :].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


def test_a_client_gone_mid_upload_is_a_499_never_a_500(service):
    # Uploads of earlier tests may still reach the Gateway on a loaded machine: start once it holds nothing but the
    # /metrics request reading the gauge, so that the next request in flight is this one.
    wait_for(
        lambda: metric(service, "gap3d_requests_in_flight") == 1,
        timeout_s=60,
        interval_s=0.2,
        what="the Gateway holding no other request",
    )
    before = generate_counts(service)
    with socket.create_connection(address(service), timeout=10) as connection:
        connection.sendall(request_head("/v1/generate", Content_Length=1000) + b'{"prompt": "a co')
        wait_for(
            lambda: metric(service, "gap3d_requests_in_flight") > 1,
            timeout_s=BODY_STALL_S / 2,
            interval_s=0.05,
            what="the Gateway reading the upload",
        )

    def new_counts() -> dict[str, float]:
        return {
            status: n - before.get(status, 0)
            for status, n in generate_counts(service).items()
            if n > before.get(status, 0)
        }

    # Wait for the abandoned upload to be counted under whatever status, so that a wrong one is named, not timed out.
    counted = wait_for(new_counts, timeout_s=30, interval_s=0.2, what="the abandoned upload counted under any status")
    assert counted == {"499": 1}, counted
