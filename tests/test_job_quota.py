"""Per-key job quotas (in-process): counts from the last sweep plus this replica's submissions since, 429 beyond."""

import pytest

from serve.api import ApiError
from serve.job_quota import JobQuota
from serve.jobs import JobsConfig, OwnerUsage

CONFIG = JobsConfig(max_active_per_key=3, max_stored_per_key=5, ttl_s=100, sweep_every_s=2)


def refusal(quota: JobQuota, owner: str, now: float = 0.0) -> ApiError:
    with pytest.raises(ApiError) as refused:
        quota.check(owner, now)
    return refused.value


def test_a_key_below_its_caps_may_submit():
    quota = JobQuota(CONFIG)
    quota.swept({"a": OwnerUsage(active=2, stored=4)}, began_at=0.0)
    quota.check("a", now=1.0)


def test_submissions_since_the_last_sweep_count_towards_the_active_cap():
    quota = JobQuota(CONFIG)
    quota.swept({}, began_at=0.0)
    for second in range(3):
        quota.check("a", now=float(second))
        quota.submitted("a", now=float(second))
    error = refusal(quota, "a", now=3.0)
    assert (error.status, error.headers["Retry-After"]) == (429, "2")
    quota.check("b", now=3.0)  # another key has its own quota


def test_a_sweep_replaces_the_submissions_it_has_seen():
    quota = JobQuota(CONFIG)
    for second in range(3):
        quota.submitted("a", now=float(second))
    quota.swept({"a": OwnerUsage(active=1, stored=3)}, began_at=2.5)  # two ended; the sweep saw all three
    quota.check("a", now=3.0)


def test_the_stored_cap_waits_for_the_oldest_ended_job_to_expire():
    quota = JobQuota(CONFIG)
    quota.swept({"a": OwnerUsage(active=0, stored=5, oldest_end=10.0)}, began_at=20.0)
    error = refusal(quota, "a", now=30.0)
    assert error.status == 429 and int(error.headers["Retry-After"]) == 10 + 100 + 2 - 30


def test_the_stored_cap_must_hold_at_least_the_active_cap():
    with pytest.raises(ValueError, match="max_stored_per_key"):
        JobsConfig(max_active_per_key=10, max_stored_per_key=5)
