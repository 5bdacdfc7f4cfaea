"""Admission of synchronous generations: only what the Decoder slots can finish within the deadline."""

import pytest

from serve.admission import DEADLINE_HEADROOM, Admission


def fill(admission: Admission, slots: float) -> int:
    """Admit until refused; returns how many were admitted."""
    count = 0
    while admission.try_admit(slots) is None:
        count += 1
        assert count < 10_000
    return count


def test_admits_as_many_as_finish_within_the_deadline():
    admission = Admission(deadline_s=30, decode_s=1.0, overhead_s=0.0)
    # The k-th admitted request (k from 0) finishes after (k + 1) decodes: all of them within 0.8 x 30 s.
    assert fill(admission, slots=1) == int(DEADLINE_HEADROOM * 30)


def test_more_decoder_slots_admit_proportionally_more():
    one, two = Admission(30, 1.0, 0.0), Admission(30, 1.0, 0.0)
    assert fill(two, slots=2) == 2 * fill(one, slots=1)


def test_a_refusal_says_when_a_slot_frees_up():
    admission = Admission(deadline_s=10, decode_s=2.0, overhead_s=0.0)
    fill(admission, slots=1)  # 4 admitted: the next would finish after 10 s, beyond 0.8 x 10
    assert admission.try_admit(1) == 2  # expected 10 s, allowed 8 s
    admission.release()
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
