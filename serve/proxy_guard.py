"""A request-body cut-off in Ray Serve's HTTP proxy, in front of the Gateway's own upload guard.

Serve's proxy reads each request body from the socket as fast as the client sends it and queues it for the
ingress replica, which pulls it as fast as it can: neither waits for the app. So the Gateway's 413
(serve/middleware.py) comes only after the proxy has read, and the replica received, whatever the client managed
to send meanwhile: hundreds of MB over a fast link. Here the proxy stops reading a body once it passes
`max_body_bytes` and tells the Gateway the body ended there; the Gateway, having read more than its limit,
answers 413 and closes the connection. The cut-off is the proxy's, so it is configured where the proxy starts:
the environment of `ray start` (or of the process that starts a local Ray),

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve.proxy_guard:middlewares
    GAP3D_PROXY_MAX_BODY_BYTES=33554432   # optional; keep it >= limits.max_body_bytes of the Serve config

as cluster/kuberay/rayservice.yaml and the tests' cluster do. A body cut below the Gateway's own limit would reach
it incomplete, so the cut-off must not be the smaller of the two.
"""

import asyncio
import os

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "serve.proxy_guard:middlewares"
MAX_BODY_ENV = "GAP3D_PROXY_MAX_BODY_BYTES"
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # serve.api.ServeLimits.max_body_bytes' default


class BodyCutoff:
    """Ends each request body, as the app sees it, at the first message past `max_body_bytes`."""

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        size, cut = 0, False

        async def receive_until_cut() -> Message:
            nonlocal size, cut
            if cut:  # read no more of this connection; the proxy cancels this wait when the request ends
                await asyncio.Event().wait()
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > self.max_body_bytes and message.get("more_body", False):
                    cut = True
                    return {**message, "more_body": False}
            return message

        await self.app(scope, receive_until_cut, send)


def middlewares() -> list[Middleware]:
    """What Serve's proxy calls at start (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH names this function)."""
    limit = int(os.environ.get(MAX_BODY_ENV, DEFAULT_MAX_BODY_BYTES))
    if limit <= 0:
        raise ValueError(f"{MAX_BODY_ENV} must be > 0, got {limit}")
    return [Middleware(BodyCutoff, max_body_bytes=limit)]
