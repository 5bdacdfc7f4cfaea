"""The Gateway: GAP3D's one HTTP endpoint (FastAPI ingress) in front of the stage deployments.

Routes: POST /v1/generate and /v1/embed (synchronous, within limits.deadline_s), the async jobs under /v1/jobs,
Hunyuan3D-2's /generate, /send and /status/{uid} (serve/hunyuan.py), GET /healthz (liveness, answered here alone),
/readyz (every deployment has a running replica, from Serve's own view), /v1/models, /metrics and the docs.
Every route but the two probes needs an API key when keys are configured.
"""

import asyncio
import hashlib
import io
import logging
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.task_consumer import instantiate_adapter_from_config

from gap3d.cancellation import CancelToken
from gap3d.trellis import MEDIA_TYPES
from serve import hunyuan
from serve.admission import Admission
from serve.api import (
    ApiError,
    GenerateRequest,
    ServeLimits,
    authorized,
    generation_inputs,
    load_api_keys,
    parse_body,
    read_body,
    stage_timing_headers,
)
from serve.job_runner import GENERATE_TASK, task_processor_config
from serve.jobs import JobConflict, JobsConfig, JobStore
from serve.metrics import ServiceMetrics
from serve.readiness import AppView
from serve.stage_calls import GenerationResult, StageHandles, run_generation

logger = logging.getLogger(__name__)

api = FastAPI(
    title="GAP3D",
    version="1",
    description="Text (+ image) to 3D assets through a VLM aligned to DINOv2 space and TRELLIS.",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)  # served below, behind the same key check as the rest
REQUEST_BODY_DOC = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": GenerateRequest.model_json_schema()}}}
}
ASSET_RESPONSES = {200: {"content": {"model/gltf-binary": {}, "model/obj": {}, "application/ply": {}}}}


def timing_headers(result: GenerationResult) -> dict:
    return {**stage_timing_headers(result.timings), "X-Aligner-Batch-Size": str(result.batch_size)}


@serve.deployment
@serve.ingress(api)
class Gateway:
    def __init__(
        self,
        prompt_encoder: DeploymentHandle,
        aligner: DeploymentHandle,
        decoder: DeploymentHandle,
        job_runner: DeploymentHandle | None,
        limits: dict,
        config: dict,
        jobs: dict | None,
        auth: dict,
    ):
        self.handles = StageHandles(prompt_encoder, aligner, decoder)
        self.job_runner = (
            job_runner  # bound so that Serve deploys it; jobs reach it through the broker, not this handle
        )
        self.limits = ServeLimits(**limits)
        self.config, self.flow = config, config["flow"]
        self.metrics = ServiceMetrics()
        self.api_keys = load_api_keys(auth.get("api_keys_file"), auth.get("api_keys_env"))
        source = auth.get("api_keys_file") or f"${auth.get('api_keys_env')}"
        logger.info(
            "auth is %s",
            f"on: {len(self.api_keys)} key(s) from {source}" if self.api_keys else "OFF: every route is open",
        )
        self.admission = Admission(self.limits.deadline_s, self.limits.expected_decode_s)
        self.app_view = AppView(serve.get_replica_context().app_name)
        self.jobs = None if jobs is None else JobStore(JobsConfig(**jobs))
        self.job_queue = (
            None if jobs is None else instantiate_adapter_from_config(task_processor_config(self.jobs.config))
        )
        loop = asyncio.get_running_loop()
        self.background = [loop.create_task(self.app_view.refresh_forever())]
        if self.jobs is not None:
            self.background.append(loop.create_task(self._sweep_forever()))

    async def _respond(self, request: Request, route: str, handler, render_error=ApiError.response) -> Response:
        """API keys, request metrics, ApiError -> response, and cancellation by a client that went away."""
        self.metrics.in_flight.inc()
        try:
            if authorized(request, self.api_keys):
                response = await handler()
            else:
                response = JSONResponse(
                    {"error": "missing or invalid API key"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
                )
        except ApiError as error:
            response = render_error(error)
        except asyncio.CancelledError:  # the client went away; the stage calls were cancelled on the way out
            self.metrics.requests.labels(route, "499").inc()
            raise
        finally:
            self.metrics.in_flight.dec()
        self.metrics.requests.labels(route, str(response.status_code)).inc()
        return response

    def _token(self) -> CancelToken:
        return CancelToken(time.time() + self.limits.deadline_s)

    def _decode_slots(self) -> float:
        """Decodes this Gateway replica may count on at once: its share of the running Decoder replicas."""
        decoders = max(self.app_view.running(self.handles.decoder.deployment_name), 1)
        gateways = max(self.app_view.running("Gateway"), 1)
        return decoders * self.limits.decoder_slots_per_replica / gateways

    async def _generate(self, body: GenerateRequest) -> GenerationResult:
        """Admission, then the three stages within the deadline."""
        inputs = generation_inputs(body, self.limits, self.flow)
        retry_after = self.admission.try_admit(self._decode_slots())
        if retry_after is not None:
            raise ApiError(
                503,
                "the service is at capacity; retry later",
                headers={"Retry-After": str(retry_after)},
                kind="overloaded",
            )
        self.metrics.admitted.inc()
        try:
            result = await run_generation(
                self.handles, inputs, self._token(), self.metrics, deadline_s=self.limits.deadline_s
            )
        finally:
            self.admission.release()
            self.metrics.admitted.dec()
        self.admission.observe(
            result.decode_seconds, sum(seconds for stage, seconds in result.timings.items() if stage != "decoder")
        )
        return result

    @api.post("/v1/generate", response_class=Response, openapi_extra=REQUEST_BODY_DOC, responses=ASSET_RESPONSES)
    async def generate(self, request: Request) -> Response:
        """Prompt (+ optional image) -> 3D asset bytes; per-stage timings in X-Timing-* headers; 503 + Retry-After "
        "when full."""

        async def handler():
            body = parse_body(GenerateRequest, await read_body(request, self.limits.max_body_bytes))
            result = await self._generate(body)
            return Response(result.asset, media_type=MEDIA_TYPES[body.format], headers=timing_headers(result))

        return await self._respond(request, "/v1/generate", handler)

    @api.post(
        "/v1/embed",
        response_class=Response,
        openapi_extra=REQUEST_BODY_DOC,
        responses={200: {"content": {"application/x-npy": {}}}},
    )
    async def embed(self, request: Request) -> Response:
        """Prompt (+ optional image) -> aligned DINOv2 tokens (N, D) float32 as .npy bytes."""

        async def handler():
            body = parse_body(GenerateRequest, await read_body(request, self.limits.max_body_bytes))
            inputs = generation_inputs(body, self.limits, self.flow)
            result = await run_generation(
                self.handles, inputs, self._token(), self.metrics, decode=False, deadline_s=self.limits.deadline_s
            )
            buffer = io.BytesIO()
            np.save(buffer, result.tokens.astype(np.float32))
            return Response(buffer.getvalue(), media_type="application/x-npy", headers=timing_headers(result))

        return await self._respond(request, "/v1/embed", handler)

    # Async jobs: state and results in the JobStore, work through the broker to the JobRunner.

    def _job_store(self) -> JobStore:
        if self.jobs is None:
            raise ApiError(
                503, "async jobs are not configured on this service (the `jobs:` builder arg)", kind="unavailable"
            )
        return self.jobs

    async def _enqueue(self, job_id: str) -> None:
        try:
            await asyncio.to_thread(self.job_queue.enqueue_task_sync, GENERATE_TASK, args=[job_id])
        except Exception as error:
            logger.error("could not queue job %s: %r", job_id, error)
            raise ApiError(
                503,
                "the job queue is unavailable; the job stays queued and is retried by the sweep",
                headers={"Retry-After": "5"},
                kind="unavailable",
            ) from None

    async def _submit(self, request: Request, body: GenerateRequest) -> tuple[str, bool]:
        """Validate, store and queue a job; returns (id, created). A replayed Idempotency-Key returns its job."""
        store = self._job_store()
        generation_inputs(body, self.limits, self.flow)  # a bad request is refused now, not failed later
        scope = hashlib.sha256(request.headers.get("authorization", "").encode("utf-8", "surrogateescape")).hexdigest()
        try:
            record, created = await asyncio.to_thread(
                store.create,
                body.model_dump_json().encode(),
                body.format,
                request.headers.get("idempotency-key"),
                scope,
            )
        except JobConflict as error:
            raise ApiError(409, str(error), field="Idempotency-Key", kind="bad_input") from None
        if created:
            await self._enqueue(record.id)
        return record.id, created

    async def _job(self, job_id: str):
        try:
            record = await asyncio.to_thread(self._job_store().get, job_id)
        except KeyError:
            record = None
        if record is None:
            raise ApiError(404, f"no job {job_id} (unknown, or its result has expired)", kind="bad_input")
        return record

    @api.post("/v1/jobs", openapi_extra=REQUEST_BODY_DOC, status_code=202)
    async def submit_job(self, request: Request) -> JSONResponse:
        """Queue a generation (same body as /v1/generate; optional Idempotency-Key header) -> 202 {id}."""

        async def handler():
            body = parse_body(GenerateRequest, await read_body(request, self.limits.max_body_bytes))
            job_id, created = await self._submit(request, body)
            headers = {"Location": f"/v1/jobs/{job_id}", **({} if created else {"Idempotent-Replayed": "true"})}
            return JSONResponse({"id": job_id}, status_code=202, headers=headers)

        return await self._respond(request, "/v1/jobs", handler)

    @api.get("/v1/jobs/{job_id}")
    async def job_status(self, job_id: str, request: Request) -> JSONResponse:
        """queued / running (stage, progress) / succeeded / failed (error) / cancelled, with per-stage timings."""

        async def handler():
            return JSONResponse((await self._job(job_id)).public())

        return await self._respond(request, "/v1/jobs/{id}", handler)

    @api.get("/v1/jobs/{job_id}/result", response_class=Response, responses=ASSET_RESPONSES)
    async def job_result(self, job_id: str, request: Request) -> Response:
        """The asset of a succeeded job; 409 while it is not."""

        async def handler():
            record = await self._job(job_id)
            asset = (
                await asyncio.to_thread(self.jobs.result, job_id, record.file_format)
                if record.status == "succeeded"
                else None
            )
            if asset is None:
                raise ApiError(409, f"job {job_id} is {record.status}; it has no result", kind="bad_input")
            return Response(asset, media_type=MEDIA_TYPES[record.file_format])

        return await self._respond(request, "/v1/jobs/{id}/result", handler)

    @api.delete("/v1/jobs/{job_id}")
    async def cancel_job(self, job_id: str, request: Request) -> JSONResponse:
        """Cancel a queued or running job (a running one stops at its next sampler step); an ended job stays as it "
        "is."""

        async def handler():
            await self._job(job_id)
            return JSONResponse((await asyncio.to_thread(self.jobs.cancel, job_id)).public())

        return await self._respond(request, "/v1/jobs/{id}", handler)

    async def _sweep_forever(self) -> None:
        while True:
            try:
                counts, requeue = await asyncio.to_thread(self.jobs.sweep)
                for state, count in counts.items():
                    self.metrics.jobs.labels(state).set(count)
                for job_id in requeue:
                    await self._enqueue(job_id)
            except Exception as error:  # storage or broker down: keep sweeping
                logger.warning("job sweep failed: %r", error)
            await asyncio.sleep(self.jobs.config.sweep_every_s)

    # Hunyuan3D-2's routes (serve/hunyuan.py has the field mapping).

    @api.post("/generate", response_class=Response, responses=ASSET_RESPONSES)
    async def hunyuan_generate(self, request: Request) -> Response:
        """Hunyuan3D-2's synchronous route: "
        "{text | image, seed, num_inference_steps, guidance_scale, face_count, type} -> file bytes."""

        async def handler():
            body = hunyuan.to_generate_request(await read_body(request, self.limits.max_body_bytes))
            result = await self._generate(body)
            return Response(result.asset, media_type=MEDIA_TYPES[body.format], headers=timing_headers(result))

        return await self._respond(request, "/generate", handler, render_error=hunyuan.error_response)

    @api.post("/send")
    async def hunyuan_send(self, request: Request) -> JSONResponse:
        """Hunyuan3D-2's async submit -> {"uid"}; poll GET /status/{uid}."""

        async def handler():
            job_id, _ = await self._submit(
                request, hunyuan.to_generate_request(await read_body(request, self.limits.max_body_bytes))
            )
            return JSONResponse({"uid": job_id})

        return await self._respond(request, "/send", handler, render_error=hunyuan.error_response)

    @api.get("/status/{uid}")
    async def hunyuan_status(self, uid: str, request: Request) -> JSONResponse:
        """Hunyuan3D-2's poll: processing / completed (model_base64) / error."""

        async def handler():
            try:
                record = await asyncio.to_thread(self._job_store().get, uid)
            except KeyError:  # not a job id at all
                record = None
            result = (
                await asyncio.to_thread(self.jobs.result, uid, record.file_format)
                if record and record.status == "succeeded"
                else None
            )
            body, status = hunyuan.status_body(record, result)
            return JSONResponse(body, status_code=status)

        return await self._respond(request, "/status/{uid}", handler, render_error=hunyuan.error_response)

    # Probes, models, metrics, docs.

    @api.get("/healthz")
    async def healthz(self, request: Request) -> JSONResponse:
        """Liveness: answered by the Gateway alone, never queued behind generation. Needs no API key."""
        self.metrics.requests.labels("/healthz", "200").inc()
        return JSONResponse({"status": "alive"})

    @api.get("/readyz")
    async def readyz(self, request: Request) -> JSONResponse:
        """Readiness: 200 once every deployment has a running replica (models loaded), from Serve's status. Needs no "
        "API key."""
        names = [name for name in self.app_view.deployments if name != "Gateway"]
        ready = bool(names) and self.app_view.ready(names)
        body = {
            "status": "ready" if ready else "loading",
            "deployments": self.app_view.describe(),
            "checked_at": self.app_view.updated_at,
        }
        self.metrics.requests.labels("/readyz", "200" if ready else "503").inc()
        return JSONResponse(body, status_code=200 if ready else 503, headers={} if ready else {"Retry-After": "5"})

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        """What each stage has loaded, from where, and the trained run's config."""

        async def handler():
            names = ("prompt_encoder", "aligner", "decoder")
            calls = [getattr(self.handles, name).ready.remote() for name in names]
            infos = await asyncio.wait_for(asyncio.gather(*calls), timeout=10)
            return JSONResponse({"stages": dict(zip(names, infos)), "config": self.config})

        return await self._respond(request, "/v1/models", handler)

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        """Prometheus text format."""

        async def handler():
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        return await self._respond(request, "/metrics", handler)

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        async def handler():
            return JSONResponse(api.openapi())

        return await self._respond(request, "/openapi.json", handler)

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        async def handler():
            return get_swagger_ui_html(openapi_url="/openapi.json", title="GAP3D API")

        return await self._respond(request, "/docs", handler)

    @api.get("/redoc", include_in_schema=False)
    async def redoc(self, request: Request) -> HTMLResponse:
        async def handler():
            return get_redoc_html(openapi_url="/openapi.json", title="GAP3D API")

        return await self._respond(request, "/redoc", handler)
