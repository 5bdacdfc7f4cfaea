"""How the gateway turns a stage's failure into an HTTP error (in-process, no cluster)."""

import asyncio

import pytest
from ray.serve.exceptions import BackPressureError

from serve.api import ApiError, ServiceMetrics
from serve.app import StageTimer


async def _raise(error: Exception):
    raise error


def run_stage(error: Exception) -> ApiError:
    with pytest.raises(ApiError) as caught:
        asyncio.run(StageTimer(ServiceMetrics(), {})("decoder", _raise(error)))
    return caught.value


def test_a_failing_stage_gives_500_naming_the_stage_without_its_message():
    error = run_stage(RuntimeError("/secret/path exploded"))
    assert (error.status, error.stage) == (500, "decoder")
    assert "/secret/path" not in error.response().body.decode()


def test_an_overloaded_stage_gives_503_with_retry_after():
    error = run_stage(BackPressureError(num_queued_requests=64, max_queued_requests=64))
    assert (error.status, error.stage, error.headers["Retry-After"]) == (503, "decoder", "2")


def test_a_successful_stage_records_its_latency():
    timings, metrics = {}, ServiceMetrics()

    async def ok():
        await asyncio.sleep(0.05)
        return 42

    assert asyncio.run(StageTimer(metrics, timings)("aligner", ok())) == 42
    assert 0.05 <= timings["aligner"] < 5
    observed = metrics.registry.get_sample_value("gap3d_stage_seconds_sum", {"stage": "aligner"})
    assert observed == pytest.approx(timings["aligner"])
