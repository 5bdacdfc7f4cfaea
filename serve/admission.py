"""Admission of synchronous generations, sized from what the Decoder replicas can finish within the deadline.

The Decoder is the slow stage (seconds per asset, one at a time per replica). A request admitted now finishes after
the decodes ahead of it plus its own: roughly (admitted // slots + 1) x decode time, with `slots` the Decoder
replicas running (times their max_ongoing_requests), shared among the Gateway replicas. A request that would
miss the deadline is refused at once with 503 and a Retry-After of about when a slot frees up, instead of
waiting in a queue until the client gives up. The decode time is learnt from the Decoder's own reports.
"""

import math
from dataclasses import dataclass

# Plan to finish within this share of the deadline: decode times vary from request to request.
DEADLINE_HEADROOM = 0.8
EWMA_WEIGHT = 0.2  # weight of the newest decode time in the running estimate


@dataclass
class Admission:
    """Counts admitted generations and decides on new ones; one per Gateway replica."""

    deadline_s: float  # the synchronous deadline (limits.deadline_s)
    decode_s: float  # current estimate of one decode's compute time, seconds
    overhead_s: float = 0.5  # prompt encoder + aligner + transfers, seconds (updated like decode_s)
    admitted: int = 0

    def expected_seconds(self, slots: float) -> float:
        """When a request admitted now would finish, given `slots` decodes that may run at once."""
        ahead = math.floor(self.admitted / max(slots, 1e-9))
        return self.overhead_s + (ahead + 1) * self.decode_s

    def try_admit(self, slots: float) -> int | None:
        """Admit one request (None) or refuse it, returning the Retry-After in whole seconds."""
        if self.expected_seconds(slots) <= DEADLINE_HEADROOM * self.deadline_s:
            self.admitted += 1
            return None
        # The expected finish moves one second closer per second as decodes complete.
        return max(1, math.ceil(self.expected_seconds(slots) - DEADLINE_HEADROOM * self.deadline_s))

    def release(self) -> None:
        self.admitted -= 1

    def observe(self, decode_s: float, overhead_s: float) -> None:
        """Fold one finished request's decode and other-stage times into the estimates."""
        self.decode_s += EWMA_WEIGHT * (decode_s - self.decode_s)
        self.overhead_s += EWMA_WEIGHT * (overhead_s - self.overhead_s)
