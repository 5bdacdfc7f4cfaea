"""The Gateway's ASGI middleware: request accounting, the in-flight cap, upload guarding and stage-timing headers.

Ray Serve's proxy reads a request body as fast as the client sends it and passes it to the Gateway replica in
batches (the replica pulls them through `receive`); neither bounds its size or its pace. So the Gateway does:
`UploadGuard` counts the body while it streams in, whatever its framing (Content-Length or chunked), and
refuses it with 413 the moment it passes `max_body_bytes`; a body that sends nothing for `body_stall_s`, or
averages less than `min_body_rate` after that, gets 408. Both close the connection. `InFlightCap` keeps the
requests one replica holds below what Serve lets it hold, so that the probes (never capped) always find room
however many uploads are open. (serve/proxy_guard.py also stops the proxy reading a body past the limit.)
"""

import asyncio
import time

from ray.exceptions import TaskCancelledError
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.api import CLIENT_GONE, ApiError, ServeLimits, stage_timing_headers
from serve.errors import error_response
from serve.metrics import ServiceMetrics

PROBES = frozenset({"/healthz", "/readyz"})
CLOSE = {"Connection": "close"}  # the rest of an unread body cannot be skipped: the connection ends


def route_label(scope: Scope, routes: list[BaseRoute]) -> str:
    """The route template a request matched ("unmatched" for none): bounded label values for the metrics."""
    route = scope.get("route")
    if route is None:  # refused before routing (or a wrong method): find the route it was meant for
        matches = {candidate.matches(scope)[0]: candidate for candidate in reversed(routes)}  # the first wins
        route = matches.get(Match.FULL) or matches.get(Match.PARTIAL)
    return getattr(route, "path", "unmatched")


class RequestAccounting:
    """Counts every request by route (one of `routes`) and status, those whose client went away (499) and those
    refused or unmatched included, and the requests in flight."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, routes: list[BaseRoute]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_noting_status)
        except asyncio.CancelledError:  # Serve cancels the request when its client disconnects
            status = status or CLIENT_GONE
            raise
        except Exception:
            status = status or 500
            raise
        finally:
            self.metrics.in_flight.dec()
            # No answer at all: the client left while its body was read, and there was nobody to answer.
            self.metrics.requests.labels(route_label(scope, self.routes), str(status or CLIENT_GONE)).inc()


class InFlightCap:
    """Refuses requests beyond `limits.max_requests_in_flight` at once (503 + Retry-After); probes pass always."""

    RETRY_AFTER_S = 2

    def __init__(self, app: ASGIApp, limits: ServeLimits):
        self.app, self.limit, self.in_flight = app, limits.max_requests_in_flight, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBES:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            headers = {"Retry-After": str(self.RETRY_AFTER_S), **CLOSE}
            response = error_response(scope["path"], 503, "the service is at capacity; retry later", headers=headers)
            return await response(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class BodyReader:
    """One request's `receive`, counting and timing its body; raises ApiError 413 / 408 / 499 as it goes."""

    def __init__(self, receive: Receive, limits: ServeLimits, declared: int | None):
        self.receive, self.limits, self.declared = receive, limits, declared
        self.size, self.started, self.complete, self.read = 0, time.monotonic(), False, False

    def _too_large(self) -> ApiError:
        return ApiError(
            413,
            f"request body is larger than {self.limits.max_body_bytes} bytes",
            field="body",
            headers=CLOSE,
            kind="bad_input",
        )

    def _too_slow(self) -> ApiError:
        return ApiError(
            408,
            f"the request body stalled or arrived slower than {self.limits.min_body_rate:g} bytes/s "
            f"({self.size} bytes in {time.monotonic() - self.started:.1f} s); send it faster",
            field="body",
            headers=CLOSE,
            kind="bad_input",
        )

    def _client_gone(self) -> ApiError:
        return ApiError(CLIENT_GONE, "the client went away during its upload", field="body", kind="client_gone")

    def _wait_s(self) -> float:
        """How long the next piece of the body may take: the stall limit, or less once the rate must hold."""
        elapsed = time.monotonic() - self.started
        rate_holds_until = self.limits.body_stall_s + self.size / self.limits.min_body_rate
        return max(0.0, min(self.limits.body_stall_s, rate_holds_until - elapsed))

    async def __call__(self) -> Message:
        if self.complete:  # after the body only a disconnect can come, whenever the client leaves
            return await self.receive()
        self.read = True
        if self.declared is not None and self.declared > self.limits.max_body_bytes:
            raise self._too_large()
        try:
            message = await asyncio.wait_for(self.receive(), timeout=self._wait_s())
        except TimeoutError:
            raise self._too_slow() from None
        except TaskCancelledError:  # Serve cancelled the request, its client gone, while the body was fetched
            raise self._client_gone() from None
        if message["type"] == "http.disconnect":
            raise self._client_gone()
        if message["type"] == "http.request":
            self.size += len(message.get("body", b""))
            if self.size > self.limits.max_body_bytes:
                raise self._too_large()
            self.complete = not message.get("more_body", False)
        return message


class UploadGuard:
    """Gives each request a BodyReader as its `receive` (see the module docstring); records the body sizes read."""

    def __init__(self, app: ASGIApp, limits: ServeLimits, metrics: ServiceMetrics):
        self.app, self.limits, self.metrics = app, limits, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")  # the proxy's HTTP parser checked its form
        declared = int(length) if length.isdigit() else None
        reader = BodyReader(receive, self.limits, declared)
        try:
            await self.app(scope, reader, send)
        finally:
            if reader.read:
                self.metrics.body_bytes.observe(reader.size)


class StageTimingHeaders:
    """Adds X-Timing-<stage>-ms and X-Aligner-Batch-Size to a response whose route left a GenerationResult in
    `request.state.generation`."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})

        async def send_with_timings(message: Message) -> None:
            result = state.get("generation")
            if message["type"] == "http.response.start" and result is not None:
                headers = {**stage_timing_headers(result.timings), "X-Aligner-Batch-Size": str(result.batch_size)}
                message["headers"] = [
                    *message.get("headers", []),
                    *((name.lower().encode(), value.encode()) for name, value in headers.items()),
                ]
            await send(message)

        await self.app(scope, receive, send_with_timings)
