"""Admission of synchronous generations, sized from what the service can finish within the deadline.

A request admitted now finishes after the work admitted before it plus its own. The Gateway estimates the rate at
which admitted requests complete: from the Decoder's own reports (running Decoder slots / decode time), and, once
requests have been completing back to back, from the measured rate itself, which is lower wherever replicas share
CPUs or another stage is the bottleneck. The smaller of the two wins. A request whose expected finish
(overhead + decode + admitted / rate) falls beyond the deadline is refused at once with 503 and a Retry-After of
about when it would fit, instead of waiting in a queue until the client gives up.
"""

import math
import time
from collections import deque
from dataclasses import dataclass, field

# Plan to finish within this share of the deadline: decode times vary from request to request.
DEADLINE_HEADROOM = 0.8
EWMA_WEIGHT = 0.2  # weight of the newest decode time in the running estimate
RATE_WINDOW = 16  # back-to-back completions the measured rate is taken over


@dataclass
class Admission:
    """Counts admitted generations and decides on new ones; one per Gateway replica."""

    deadline_s: float  # the synchronous deadline (limits.deadline_s)
    decode_s: float  # current estimate of one decode's compute time, seconds
    overhead_s: float = 0.5  # prompt encoder + aligner + transfers, seconds (updated like decode_s)
    admitted: int = 0
    _busy_completions: deque = field(
        default_factory=lambda: deque(maxlen=RATE_WINDOW)
    )  # times of completions with work still in flight

    def completion_rate(self, slots: float, now: float | None = None) -> float:
        """Requests per second the service completes: min(slots / decode time, the rate measured while busy)."""
        rate = slots / self.decode_s
        times = self._busy_completions
        now = time.monotonic() if now is None else now
        # A measured rate counts while it is recent: the last completion within the time a full window would take.
        if len(times) >= 4 and times[-1] > times[0] and now - times[-1] < RATE_WINDOW * self.decode_s:
            rate = min(rate, (len(times) - 1) / (times[-1] - times[0]))
        return rate

    def expected_seconds(self, slots: float, now: float | None = None) -> float:
        """When a request admitted now would finish."""
        return self.overhead_s + self.decode_s + self.admitted / self.completion_rate(slots, now)

    def try_admit(self, slots: float, now: float | None = None) -> int | None:
        """Admit one request (None) or refuse it, returning the Retry-After in whole seconds."""
        expected = self.expected_seconds(slots, now)
        if expected <= DEADLINE_HEADROOM * self.deadline_s:
            self.admitted += 1
            return None
        # The expected finish moves one second closer per second as admitted requests complete.
        return max(1, math.ceil(expected - DEADLINE_HEADROOM * self.deadline_s))

    def release(self, now: float | None = None) -> None:
        """One admitted request ended (whatever its outcome)."""
        self.admitted -= 1
        if self.admitted > 0:
            self._busy_completions.append(time.monotonic() if now is None else now)
        else:
            self._busy_completions.clear()  # idle: the next busy period measures afresh

    def observe(self, decode_s: float, overhead_s: float) -> None:
        """Fold one finished request's decode and other-stage times into the estimates."""
        self.decode_s += EWMA_WEIGHT * (decode_s - self.decode_s)
        self.overhead_s += EWMA_WEIGHT * (overhead_s - self.overhead_s)
