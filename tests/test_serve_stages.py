"""How the service waits on a stage call: its errors as HTTP errors, its deadline and cancellation (in-process, no
cluster)."""

import asyncio
import time

import pytest
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from gap3d.cancellation import Cancelled, CancelToken
from gap3d.prompt_encoder import PromptTooLongError
from serve.api import ApiError
from serve.errors import error_response
from serve.metrics import ServiceMetrics
from serve.stage_calls import StageCaller


class StageResponse:
    """Stands in for a DeploymentResponse: awaiting it runs `coroutine`; cancel() is recorded as Serve would act on
    it."""

    def __init__(self, coroutine):
        self.coroutine, self.cancelled = coroutine, False

    def __await__(self):
        return self.coroutine.__await__()

    def cancel(self):
        self.cancelled = True


async def _raise(error: Exception):
    raise error


async def _sleep(seconds: float, value=42):
    await asyncio.sleep(seconds)
    return value


def call(
    response: StageResponse,
    token: CancelToken | None = None,
    metrics: ServiceMetrics | None = None,
    timings: dict | None = None,
):
    caller = StageCaller(
        token or CancelToken(time.time() + 60),
        metrics or ServiceMetrics(),
        {} if timings is None else timings,
        deadline_s=60,
    )
    return asyncio.run(caller("decoder", response))


def error_of(response: StageResponse, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call(response, **kwargs)
    return caught.value


def test_a_failing_stage_gives_500_naming_the_stage_without_its_message():
    metrics = ServiceMetrics()
    error = error_of(StageResponse(_raise(RuntimeError("/secret/path exploded"))), metrics=metrics)
    assert (error.status, error.stage) == (500, "decoder")
    rendered = error_response("/v1/generate", error.status, error.message, error.field, error.stage)
    assert "/secret/path" not in rendered.body.decode()
    assert metrics.registry.get_sample_value("gap3d_stage_errors_total", {"stage": "decoder", "kind": "failed"}) == 1


def test_an_overloaded_stage_gives_503_with_retry_after():
    error = error_of(StageResponse(_raise(BackPressureError(num_queued_requests=64, max_queued_requests=64))))
    assert (error.status, error.kind, error.headers["Retry-After"]) == (503, "overloaded", "2")


def test_a_replica_lost_mid_request_gives_a_503_the_client_may_retry():
    error = error_of(StageResponse(_raise(RayActorError())))
    assert (error.status, error.kind, error.headers["Retry-After"]) == (503, "replica_lost", "2")


def test_a_stage_refusing_work_past_the_deadline_gives_503():
    error = error_of(StageResponse(_raise(Cancelled("deadline"))))
    assert (error.status, error.kind) == (503, "deadline")


def test_a_prompt_over_the_token_limit_is_a_422_on_the_prompt():
    error = error_of(StageResponse(_raise(PromptTooLongError("too long"))))
    assert (error.status, error.field) == (422, "prompt")


def test_the_deadline_ends_the_wait_with_503_and_cancels_the_stage_call():
    metrics, response = ServiceMetrics(), StageResponse(_sleep(30))
    start = time.perf_counter()
    error = error_of(response, token=CancelToken(time.time() + 0.3), metrics=metrics)
    assert (error.status, error.kind, "Retry-After" in error.headers) == (503, "deadline", True)
    assert response.cancelled and time.perf_counter() - start < 10
    assert metrics.registry.get_sample_value("gap3d_requests_cancelled_total", {"reason": "deadline"}) == 1


def test_a_cancelled_token_ends_the_wait_and_cancels_the_stage_call():
    token, response = CancelToken(time.time() + 60), StageResponse(_sleep(30))

    async def cancel_soon():
        await asyncio.sleep(0.3)
        token.cancel()

    async def run():
        caller = StageCaller(token, ServiceMetrics(), {}, deadline_s=60)
        return await asyncio.gather(caller("decoder", response), cancel_soon())

    with pytest.raises(ApiError) as caught:
        asyncio.run(run())
    assert caught.value.kind == "cancelled" and response.cancelled


def test_a_client_gone_cancels_the_stage_call():
    response = StageResponse(_sleep(30))

    async def run():
        task = asyncio.ensure_future(
            StageCaller(CancelToken(time.time() + 60), ServiceMetrics(), {}, deadline_s=60)("decoder", response)
        )
        await asyncio.sleep(0.3)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    assert response.cancelled


def test_a_successful_stage_records_its_latency():
    timings, metrics = {}, ServiceMetrics()
    assert call(StageResponse(_sleep(0.05)), metrics=metrics, timings=timings) == 42
    assert 0.05 <= timings["decoder"] < 5
    observed = metrics.registry.get_sample_value("gap3d_stage_seconds_sum", {"stage": "decoder", "outcome": "ok"})
    assert observed == pytest.approx(timings["decoder"])
