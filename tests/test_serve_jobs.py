"""Async jobs over real HTTP: submit, poll, result, cancel, idempotency, and a JobRunner killed with a job in flight."""

import io

import httpx
import trimesh

from tests.serving import AUTH, LEASE_S, MAX_ACTIVE_JOBS, QUOTA_AUTH, kill, post, replicas, wait_for

ENDED = ("succeeded", "failed", "cancelled")


def job(service: str, job_id: str) -> dict:
    return httpx.get(f"{service}/v1/jobs/{job_id}", headers=AUTH, timeout=10).json()


def wait_until_ended(service: str, job_id: str, timeout_s: float = 120) -> dict:
    return wait_for(
        lambda: (state := job(service, job_id))["status"] in ENDED and state, timeout_s, 0.2, f"job {job_id} ending"
    )


def submit_long_job(service: str) -> str:
    """A job with the most sampling steps the limits allow (seconds of work), once it is running."""
    job_id = post(service, "/v1/jobs", {"prompt": "a large blue cube", "seed": 5, "steps": 50}).json()["id"]
    wait_for(
        lambda: job(service, job_id)["status"] != "queued", timeout_s=60, interval_s=0.02, what=f"job {job_id} starting"
    )
    return job_id


def test_a_job_runs_to_success_and_its_result_is_the_asset(service):
    response = post(service, "/v1/jobs", {"prompt": "a large blue cube", "seed": 5, "format": "glb"})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert response.headers["location"] == f"/v1/jobs/{job_id}"
    state = wait_until_ended(service, job_id)
    assert state["status"] == "succeeded", state
    assert set(state["timings"]) == {"prompt_encoder", "aligner", "decoder"} and state["progress"] == 1.0
    result = httpx.get(f"{service}/v1/jobs/{job_id}/result", headers=AUTH, timeout=30)
    assert result.headers["content-type"] == "model/gltf-binary"
    assert len(trimesh.load(io.BytesIO(result.content), file_type="glb", force="mesh").faces) > 0


def test_a_replayed_idempotency_key_returns_the_first_job(service):
    body, headers = {"prompt": "a small red cone", "seed": 3}, {**AUTH, "Idempotency-Key": "order-17"}
    first = post(service, "/v1/jobs", body, headers=headers)
    again = post(service, "/v1/jobs", body, headers=headers)
    assert first.json()["id"] == again.json()["id"] and again.headers["idempotent-replayed"] == "true"
    other = post(service, "/v1/jobs", {**body, "seed": 4}, headers=headers)
    assert other.status_code == 409 and other.json()["field"] == "Idempotency-Key"


def test_a_bad_request_is_refused_at_submission(service):
    response = post(service, "/v1/jobs", {"prompt": "a cone", "steps": 10_000})
    assert (response.status_code, response.json()["field"]) == (422, "steps")


def test_a_prompt_over_the_token_limit_is_refused_at_submission(service):
    response = post(service, "/v1/jobs", {"prompt": "word " * 300})  # under the character cap
    assert (response.status_code, response.json()["field"]) == (422, "prompt")
    assert "tokens" in response.json()["error"]


def test_the_per_key_job_quota_answers_429_with_retry_after(service):
    submitted, refused = [], None
    for _ in range(MAX_ACTIVE_JOBS + 3):  # a job or two may end meanwhile
        response = post(service, "/v1/jobs", {"prompt": "a large blue cube", "steps": 50}, headers=QUOTA_AUTH)
        if response.status_code != 202:
            refused = response
            break
        submitted.append(response.json()["id"])
    try:
        assert refused is not None and refused.status_code == 429, refused and refused.text
        assert int(refused.headers["retry-after"]) >= 1 and "limit" in refused.json()["error"]
        assert post(service, "/v1/jobs", {"prompt": "a cone", "seed": 9}).status_code == 202  # another key's quota
    finally:
        for job_id in submitted:
            httpx.delete(f"{service}/v1/jobs/{job_id}", headers=QUOTA_AUTH, timeout=10)


def test_an_unknown_or_malformed_job_id_is_404(service):
    for job_id in ("0" * 32, "not-a-job-id"):
        assert httpx.get(f"{service}/v1/jobs/{job_id}", headers=AUTH, timeout=10).status_code == 404


def test_a_running_job_cancelled_stops_and_never_gets_a_result(service):
    job_id = submit_long_job(service)
    assert httpx.delete(f"{service}/v1/jobs/{job_id}", headers=AUTH, timeout=10).json()["status"] == "cancelled"
    assert wait_until_ended(service, job_id)["status"] == "cancelled"
    assert httpx.get(f"{service}/v1/jobs/{job_id}/result", headers=AUTH, timeout=10).status_code == 409


def test_a_job_whose_runner_is_killed_shows_it_before_its_lease_runs_out(service):
    runners = replicas("JobRunnerDeployment")
    job_id = submit_long_job(service)
    kill(runners)
    state = wait_for(
        lambda: (current := job(service, job_id))["status"] != "running" and current,
        timeout_s=4 * LEASE_S,
        interval_s=0.05,
        what="the job leaving 'running'",
    )
    # Requeued because Ray no longer knows its runner, not because its heartbeat went stale.
    assert state["status"] == "queued" and "runner replica died" in state["error"], state
    assert wait_until_ended(service, job_id, timeout_s=180)["status"] == "succeeded"


def test_a_job_whose_runner_is_killed_is_run_again_and_succeeds(service):
    runners = replicas("JobRunnerDeployment")
    job_id = submit_long_job(service)
    kill(runners)
    state = wait_until_ended(service, job_id, timeout_s=180)
    assert (state["status"], state["attempts"]) == ("succeeded", 2), (state["error"], state)
