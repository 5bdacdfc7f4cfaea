"""Cooperative cancellation of long inference loops: a deadline and a cancel flag, checked between steps.

Whoever runs the work (a Serve replica, a job runner) enters `cancellable(token)`; the samplers call
`raise_if_cancelled()` once per step. The token travels in a context variable, so no sampler signature has to
carry it; outside `cancellable` the check does nothing. Times are absolute `time.time()` seconds, so a deadline
set by one process means the same moment in another.
"""

import contextlib
import contextvars
import threading
import time
from collections.abc import Iterator


class Cancelled(Exception):
    """Work abandoned: `reason` is "deadline" (it ran past its deadline) or "cancelled" (someone asked)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class CancelToken:
    """A deadline (absolute time.time(), or None) plus a flag any thread may set."""

    def __init__(self, deadline: float | None = None):
        self.deadline = deadline
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def remaining(self) -> float:
        """Seconds left before the deadline (inf without one)."""
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def check(self) -> None:
        """Raise Cancelled if the flag is set or the deadline has passed."""
        if self._event.is_set():
            raise Cancelled("cancelled")
        if self.remaining() <= 0:
            raise Cancelled("deadline")


_current: contextvars.ContextVar[CancelToken | None] = contextvars.ContextVar("gap3d_cancel_token", default=None)


@contextlib.contextmanager
def cancellable(token: CancelToken) -> Iterator[CancelToken]:
    """Run the enclosed work under `token`: `raise_if_cancelled` inside it checks this token."""
    reset = _current.set(token)
    try:
        token.check()
        yield token
    finally:
        _current.reset(reset)


def raise_if_cancelled() -> None:
    """Raise Cancelled when the surrounding `cancellable` token is cancelled or past its deadline."""
    token = _current.get()
    if token is not None:
        token.check()
