"""Per-key caps on async jobs: how many one API key may have queued or running, and stored.

The counts come from the Gateway's sweep of the job store (serve/jobs.py), which reads every record anyway, plus
the jobs this replica created since that sweep began; a refused submission gets 429 with a Retry-After of
about when it would fit. With several Gateway replicas, each adds only its own submissions between sweeps, so
a key can pass its cap by what the other replicas accepted within one sweep interval.
"""

import math
import time
from collections import deque

from serve.api import ApiError
from serve.jobs import JobsConfig, OwnerUsage


class JobQuota:
    """One Gateway replica's view of each key's jobs, and the check a submission passes."""

    def __init__(self, config: JobsConfig):
        self.config = config
        self.usage: dict[str, OwnerUsage] = {}
        self.swept_from: float | None = None  # when the sweep behind `usage` began
        self._recent: deque[tuple[float, str]] = deque()  # (time, owner) of this replica's submissions

    def swept(self, usage: dict[str, OwnerUsage], began_at: float) -> None:
        """Take the counts of a sweep that began at `began_at`; submissions before that are in them."""
        self.usage, self.swept_from = usage, began_at
        while self._recent and self._recent[0][0] < began_at:
            self._recent.popleft()

    def submitted(self, owner: str, now: float | None = None) -> None:
        self._recent.append((time.time() if now is None else now, owner))

    def check(self, owner: str, now: float | None = None) -> None:
        """Raise ApiError 429 (with Retry-After) when `owner` may not submit another job now."""
        now = time.time() if now is None else now
        usage = self.usage.get(owner, OwnerUsage())
        since = sum(1 for _, submitter in self._recent if submitter == owner)
        if usage.active + since >= self.config.max_active_per_key:
            # The count falls as jobs end; the sweep re-reads it every sweep_every_s.
            raise self._refusal(
                f"this API key has {self.config.max_active_per_key} jobs queued or running, its limit; wait for "
                "one to end or cancel one",
                math.ceil(self.config.sweep_every_s),
            )
        if usage.stored + since >= self.config.max_stored_per_key:
            expires = (usage.oldest_end or now) + self.config.ttl_s + self.config.sweep_every_s
            raise self._refusal(
                f"this API key has {self.config.max_stored_per_key} jobs stored, its limit; ended jobs are deleted "
                f"{self.config.ttl_s:g} s after they end",
                math.ceil(expires - now),
            )

    @staticmethod
    def _refusal(message: str, retry_after_s: int) -> ApiError:
        return ApiError(429, message, headers={"Retry-After": str(max(1, retry_after_s))}, kind="quota")
