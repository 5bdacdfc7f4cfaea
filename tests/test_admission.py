"""Admission of synchronous generations: only what the service can finish within the deadline."""

import pytest

from serve.admission import DEADLINE_HEADROOM, Admission


def fill(admission: Admission, slots: float, now: float = 0.0) -> int:
    """Admit until refused; returns how many were admitted."""
    count = 0
    while admission.try_admit(slots, now) is None:
        count += 1
        assert count < 10_000
    return count


def test_an_idle_service_admits_as_many_as_its_decoders_finish_within_the_deadline():
    admission = Admission(deadline_s=30, decode_s=1.0, overhead_s=0.0)
    # The k-th admitted request (k from 0) finishes after (k + 1) decodes: all of them within 0.8 x 30 s.
    assert fill(admission, slots=1) == int(DEADLINE_HEADROOM * 30)


def test_more_decoder_slots_admit_more():
    # The k-th finishes after 1 + k / 2 decodes with two slots: k = 0..46 fit in 24 s.
    assert fill(Admission(30, 1.0, 0.0), slots=2) == 47


def test_a_measured_completion_rate_below_the_decoders_own_limits_admission():
    admission = Admission(deadline_s=30, decode_s=0.5, overhead_s=0.0)
    admission.admitted = 30
    for second in range(
        8
    ):  # one completion a second while busy (each replaced by a new request): half what 1 slot / 0.5 s promises
        admission.release(now=float(second))
        admission.admitted += 1
    assert admission.completion_rate(slots=1, now=8.0) == pytest.approx(1.0)
    assert admission.try_admit(slots=1, now=8.0) is not None  # 0.5 + 30 / 1.0 > 24 s
    assert admission.completion_rate(slots=1, now=100.0) == pytest.approx(2.0)  # an old measurement no longer counts
    assert admission.try_admit(slots=1, now=100.0) is None  # 0.5 + 30 / 2.0 <= 24 s


def test_a_refusal_says_when_the_request_would_fit():
    admission = Admission(deadline_s=10, decode_s=2.0, overhead_s=0.0)
    fill(admission, slots=1)  # 4 admitted: a 5th would finish after 2 + 4 x 2 = 10 s, 2 s beyond 0.8 x 10
    assert admission.admitted == 4
    assert admission.try_admit(1) == 2
    admission.release()
    assert admission.try_admit(1) is None


def test_a_decode_slower_than_the_deadline_admits_nothing():
    assert Admission(deadline_s=5, decode_s=10.0).try_admit(4) >= 1


def test_observed_decode_times_move_the_estimate():
    admission = Admission(deadline_s=30, decode_s=2.0, overhead_s=0.5)
    for _ in range(50):
        admission.observe(decode_s=0.5, overhead_s=0.1)
    assert admission.decode_s == pytest.approx(0.5, abs=1e-3)
    assert admission.overhead_s == pytest.approx(0.1, abs=1e-3)
