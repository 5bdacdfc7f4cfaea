"""The three stages composed over DeploymentHandles, with a deadline, cancellation and errors a client can act on.

`run_generation` is the one place where the service turns a prompt into tokens and an asset: the Gateway's
synchronous routes and the JobRunner's jobs both call it. Each stage call waits at most until the request's
deadline; past it, or once the token is cancelled (client gone, job deleted), the stage call is cancelled as well,
so no replica keeps working for nobody. Failures become ApiErrors that name the stage and never carry a
replica's traceback.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from gap3d.cancellation import Cancelled, CancelToken
from gap3d.prompt_encoder import PromptTooLongError
from gap3d.trellis import EmptyStructureError
from serve.api import ApiError, GenerationInputs
from serve.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

POLL_S = 0.25  # how often a waiting stage call looks at the token (cancel flag and deadline)
RETRY_AFTER_S = 2  # Retry-After of a 503 for a stage that is overloaded or restarting


@dataclass
class AlignRequest:
    """One prompt's request to the batched Aligner."""

    cond: np.ndarray  # (s, d_vlm) float32 soft-token latents
    seed: int
    steps: int
    cfg_scale: float
    deadline: float | None  # absolute time.time() after which the result is of no use


@dataclass
class StageHandles:
    prompt_encoder: DeploymentHandle
    aligner: DeploymentHandle
    decoder: DeploymentHandle


@dataclass
class GenerationResult:
    tokens: np.ndarray  # (N, D) float32 aligned DINOv2 tokens
    batch_size: int  # size of the Aligner batch the request was served in
    timings: dict[str, float]  # seconds per stage, as seen by the caller
    asset: bytes | None = None  # the asset file (None when decoding was not asked for)
    decode_seconds: float | None = None  # the Decoder's own compute time, without its queue


def stage_error(stage: str, error: BaseException, deadline_s: float | None) -> ApiError:
    """The ApiError a client gets for `error` raised by (or while waiting for) `stage`."""
    retry = {"Retry-After": str(RETRY_AFTER_S)}
    if isinstance(error, Cancelled):
        if error.reason == "deadline":
            limit = f"its {deadline_s:g} s deadline" if deadline_s else "its deadline"
            return ApiError(
                503,
                f"the request did not finish within {limit}; retry later",
                stage=stage,
                headers=retry,
                kind="deadline",
            )
        return ApiError(409, "the request was cancelled", stage=stage, kind="cancelled")
    if isinstance(error, BackPressureError):
        return ApiError(
            503, f"the {stage} stage is overloaded; retry later", stage=stage, headers=retry, kind="overloaded"
        )
    if isinstance(error, (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)):
        return ApiError(
            503,
            f"a replica of the {stage} stage was lost while serving this request; retry",
            stage=stage,
            headers=retry,
            kind="replica_lost",
        )
    if isinstance(error, PromptTooLongError):
        # str() of the wrapped error would carry the replica's traceback; never send that to clients.
        return ApiError(
            422,
            "prompt has more tokens than the VLM's vlm.max_prompt_tokens allows",
            field="prompt",
            stage=stage,
            kind="bad_input",
        )
    if isinstance(error, EmptyStructureError):
        return ApiError(
            422, "the decoded 3D structure is empty; try another seed or prompt", stage=stage, kind="bad_input"
        )
    return ApiError(500, f"the {stage} stage failed", stage=stage, kind="failed")


async def _resolve(response: DeploymentResponse):
    return await response


class StageCaller:
    """Awaits one stage call under the request's token; records latency by outcome, errors and waiting requests."""

    def __init__(self, token: CancelToken, metrics: ServiceMetrics | None, timings: dict, deadline_s: float | None):
        self.token, self.metrics, self.timings, self.deadline_s = token, metrics, timings, deadline_s

    async def __call__(self, stage: str, response: DeploymentResponse):
        start, outcome = time.perf_counter(), "ok"
        if self.metrics:
            self.metrics.stage_waiting.labels(stage).inc()
        try:
            return await self._wait(response)
        except asyncio.CancelledError:
            outcome = "client_gone"
            raise
        except Exception as error:
            api_error = stage_error(stage, error, self.deadline_s)
            outcome = api_error.kind
            if api_error.kind == "failed":
                logger.error("stage %s failed: %r", stage, error)
            raise api_error from None
        finally:
            elapsed = time.perf_counter() - start
            if self.metrics:
                self.metrics.stage_waiting.labels(stage).dec()
                self.metrics.stage_seconds.labels(stage, outcome).observe(elapsed)
                if outcome != "ok":
                    self.metrics.stage_errors.labels(stage, outcome).inc()
                if outcome in ("deadline", "client_gone"):
                    self.metrics.cancelled.labels("deadline" if outcome == "deadline" else "client").inc()
            if outcome == "ok":
                self.timings[stage] = elapsed

    async def _wait(self, response: DeploymentResponse):
        task = asyncio.ensure_future(_resolve(response))
        try:
            while not task.done():
                self.token.check()
                await asyncio.wait({task}, timeout=max(0.0, min(POLL_S, self.token.remaining())))
        except (Cancelled, asyncio.CancelledError):
            response.cancel()  # reaches the replica: an async stage method sees CancelledError and stops its work
            task.cancel()
            raise
        return task.result()


async def run_generation(
    handles: StageHandles,
    inputs: GenerationInputs,
    token: CancelToken,
    metrics: ServiceMetrics | None = None,
    decode: bool = True,
    deadline_s: float | None = None,
    on_stage: Callable[[str, float], None] | None = None,
) -> GenerationResult:
    """Prompt encoder -> aligner -> (decoder) for one request; `on_stage(name, progress)` before each stage."""
    timings: dict[str, float] = {}
    call = StageCaller(token, metrics, timings, deadline_s)
    stages = 3 if decode else 2

    def starting(stage: str, done: int) -> None:
        if on_stage:
            on_stage(stage, done / stages)

    starting("prompt_encoder", 0)
    cond = await call(
        "prompt_encoder", handles.prompt_encoder.encode.remote(inputs.prompt, inputs.image, token.deadline)
    )
    starting("aligner", 1)
    tokens, batch_size = await call(
        "aligner",
        handles.aligner.remote(AlignRequest(cond, inputs.seed, inputs.steps, inputs.cfg_scale, token.deadline)),
    )
    if metrics:
        metrics.batch_size.observe(batch_size)
    result = GenerationResult(tokens=tokens, batch_size=batch_size, timings=timings)
    if decode:
        starting("decoder", 2)
        result.asset, result.decode_seconds = await call(
            "decoder",
            handles.decoder.decode.remote(tokens, inputs.seed, inputs.file_format, inputs.target_faces, token.deadline),
        )
    return result
