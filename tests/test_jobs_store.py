"""The async jobs' store: records, idempotency, the runner's claim/report/finish, and the sweep (local disk and S3)."""

import pytest

from serve.jobs import JobConflict, JobsConfig, JobStore

BODY = b'{"prompt": "a red cone", "seed": 1}'


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    root = str(tmp_path / "jobs") if request.param == "local" else request.getfixturevalue("s3_bucket") + "/jobs"
    return JobStore(JobsConfig(store=root, lease_s=10, max_attempts=2, ttl_s=100, max_queued_s=50))


def test_a_new_job_is_queued_with_its_request_stored(store):
    record, created = store.create(BODY, "glb")
    assert created and store.get(record.id).status == "queued"
    assert store.request(record.id) == BODY
    assert store.ids() == [record.id]


def test_a_replayed_idempotency_key_returns_the_same_job(store):
    first, _ = store.create(BODY, "glb", idempotency_key="key-1", scope="caller-a")
    again, created = store.create(BODY, "glb", idempotency_key="key-1", scope="caller-a")
    assert (again.id, created) == (first.id, False)
    assert store.ids() == [first.id]


def test_an_idempotency_key_is_scoped_to_its_caller(store):
    first, _ = store.create(BODY, "glb", idempotency_key="key-1", scope="caller-a")
    other, created = store.create(BODY, "glb", idempotency_key="key-1", scope="caller-b")
    assert created and other.id != first.id


def test_an_idempotency_key_reused_with_another_body_is_a_conflict(store):
    store.create(BODY, "glb", idempotency_key="key-1")
    with pytest.raises(JobConflict, match="key-1"):
        store.create(b'{"prompt": "a blue cube"}', "glb", idempotency_key="key-1")


def test_only_a_queued_job_can_be_claimed(store):
    record, _ = store.create(BODY, "glb")
    run = store.claim(record.id)
    assert run.status == "running" and run.attempts == 1
    assert store.claim(record.id) is None


def test_a_finished_run_stores_its_result_and_timings(store):
    record, _ = store.create(BODY, "obj")
    run = store.claim(record.id)
    assert store.report(run, "decoder", 2 / 3)
    assert store.get(record.id).stage == "decoder"
    assert store.finish(run, "succeeded", timings={"decoder": 0.5}, result=b"mesh bytes")
    done = store.get(record.id)
    assert (done.status, done.progress, done.timings) == ("succeeded", 1.0, {"decoder": 0.5})
    assert store.result(record.id, "obj") == b"mesh bytes"


def test_a_cancelled_job_stops_its_run_and_keeps_no_result(store):
    record, _ = store.create(BODY, "glb")
    run = store.claim(record.id)
    store.cancel(record.id)
    assert not store.report(run)
    assert not store.finish(run, "succeeded", result=b"late")
    assert store.get(record.id).status == "cancelled"
    assert store.result(record.id, "glb") is None


def test_cancelling_an_ended_job_changes_nothing(store):
    record, _ = store.create(BODY, "glb")
    run = store.claim(record.id)
    store.finish(run, "succeeded", result=b"x")
    assert store.cancel(record.id).status == "succeeded"


def test_the_sweep_requeues_a_run_whose_worker_stopped_reporting(store):
    record, _ = store.create(BODY, "glb")
    run = store.claim(record.id)
    counts, requeue = store.sweep(now=run.heartbeat_at + 11)
    assert requeue == [record.id] and counts["queued"] == 1
    assert not store.finish(run, "succeeded", result=b"x")  # the lost run may not write over its successor
    second = store.claim(record.id)
    assert second.attempts == 2


def test_the_sweep_fails_a_job_that_lost_its_worker_max_attempts_times(store):
    record, _ = store.create(BODY, "glb")
    for _ in range(2):
        run = store.claim(record.id)
        counts, requeue = store.sweep(now=run.heartbeat_at + 11)
    assert requeue == [] and counts["failed"] == 1
    assert "lost on each of 2 attempts" in store.get(record.id).error


def test_the_sweep_leaves_a_run_that_reports_in_time(store):
    record, _ = store.create(BODY, "glb")
    run = store.claim(record.id)
    counts, requeue = store.sweep(now=run.heartbeat_at + 5)
    assert requeue == [] and counts["running"] == 1


def test_the_sweep_fails_a_job_queued_past_max_queued_s(store):
    record, _ = store.create(BODY, "glb")
    store.sweep(now=record.queued_at + 51)
    assert store.get(record.id).status == "failed"


def test_the_sweep_deletes_ended_jobs_after_their_ttl(store):
    record, _ = store.create(BODY, "glb")
    run = store.claim(record.id)
    store.finish(run, "succeeded", result=b"x")
    ended = store.get(record.id).finished_at
    store.sweep(now=ended + 99)
    assert store.get(record.id) is not None
    store.sweep(now=ended + 101)
    assert store.get(record.id) is None and store.ids() == []


@pytest.mark.parametrize("job_id", ["../etc", "ABC", "0" * 31, "0" * 32 + "/x"])
def test_a_malformed_job_id_is_unknown_not_a_path(store, job_id):
    with pytest.raises(KeyError):
        store.get(job_id)
