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
    first, _ = store.create(BODY, "glb", idempotency_key="key-1", owner="caller-a")
    again, created = store.create(BODY, "glb", idempotency_key="key-1", owner="caller-a")
    assert (again.id, created) == (first.id, False)
    assert store.ids() == [first.id]


def test_an_idempotency_key_is_scoped_to_its_caller(store):
    first, _ = store.create(BODY, "glb", idempotency_key="key-1", owner="caller-a")
    other, created = store.create(BODY, "glb", idempotency_key="key-1", owner="caller-b")
    assert created and other.id != first.id


def test_an_idempotency_key_reused_with_another_body_is_a_conflict(store):
    store.create(BODY, "glb", idempotency_key="key-1")
    with pytest.raises(JobConflict, match="another request body"):
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
    swept = store.sweep(now=run.heartbeat_at + 11)
    assert swept.requeue == [record.id] and swept.counts["queued"] == 1
    assert not store.finish(run, "succeeded", result=b"x")  # the lost run may not write over its successor
    second = store.claim(record.id)
    assert second.attempts == 2


def test_the_sweep_fails_a_job_that_lost_its_worker_max_attempts_times(store):
    record, _ = store.create(BODY, "glb")
    for _ in range(2):
        run = store.claim(record.id)
        swept = store.sweep(now=run.heartbeat_at + 11)
    assert swept.requeue == [] and swept.counts["failed"] == 1
    assert "lost on each of 2 attempts" in store.get(record.id).error


def test_the_sweep_leaves_a_run_that_reports_in_time(store):
    record, _ = store.create(BODY, "glb")
    run = store.claim(record.id)
    swept = store.sweep(now=run.heartbeat_at + 5)
    assert swept.requeue == [] and swept.counts["running"] == 1


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


def test_a_run_whose_runner_died_is_queued_again_at_once_naming_the_cause(store):
    record, _ = store.create(BODY, "glb")
    run = store.claim(record.id, runner="replica-a")
    swept = store.sweep(now=run.heartbeat_at + 1, runner_alive=lambda name: name != "replica-a")
    assert swept.requeue == [record.id]
    queued = store.get(record.id)
    assert (queued.status, queued.runner) == ("queued", None) and "runner replica died" in queued.error


def test_a_run_whose_runner_lives_is_left_running(store):
    record, _ = store.create(BODY, "glb")
    run = store.claim(record.id, runner="replica-a")
    assert store.sweep(now=run.heartbeat_at + 1, runner_alive=lambda name: True).requeue == []
    assert store.get(record.id).status == "running"


IMAGE = b"aGVsbG8="


def test_the_image_is_kept_apart_until_the_job_ends(store):
    record, _ = store.create(BODY, "glb", image=IMAGE)
    assert store.request_image(record.id) == IMAGE and store.request(record.id) == BODY
    store.finish(store.claim(record.id), "succeeded", result=b"x")
    assert store.request_image(record.id) is None and store.request(record.id) == BODY


@pytest.mark.parametrize("end", ["cancel", "fail"])
def test_a_cancelled_or_failed_job_drops_its_image(store, end):
    record, _ = store.create(BODY, "glb", image=IMAGE)
    if end == "cancel":
        store.cancel(record.id)
    else:
        store.sweep(now=record.queued_at + 51)  # past max_queued_s
    assert store.get(record.id).ended and store.request_image(record.id) is None


def test_a_requeued_job_keeps_its_image(store):
    record, _ = store.create(BODY, "glb", image=IMAGE)
    run = store.claim(record.id)
    store.sweep(now=run.heartbeat_at + 11)
    assert store.request_image(record.id) == IMAGE


def test_an_idempotency_key_replayed_with_another_image_is_a_conflict(store):
    store.create(BODY, "glb", idempotency_key="key-1", image=IMAGE)
    with pytest.raises(JobConflict):
        store.create(BODY, "glb", idempotency_key="key-1", image=b"b3RoZXI=")


def test_the_sweep_counts_each_owners_active_and_stored_jobs(store):
    for _ in range(2):
        store.create(BODY, "glb", owner="a")
    done, _ = store.create(BODY, "glb", owner="b")
    store.finish(store.claim(done.id), "succeeded", result=b"x")
    usage = store.sweep().usage
    assert (usage["a"].active, usage["a"].stored, usage["a"].oldest_end) == (2, 2, None)
    assert (usage["b"].active, usage["b"].stored) == (0, 1)
    assert usage["b"].oldest_end == store.get(done.id).finished_at
