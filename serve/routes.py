"""The Gateway's HTTP API in FastAPI's idioms: typed bodies, a security dependency, exception handlers, middleware.

Routes: POST /v1/generate and /v1/embed (synchronous, within limits.deadline_s), the async jobs under /v1/jobs,
Hunyuan3D-2's /generate, /send and /status/{uid} (serve/hunyuan.py), GET /healthz (liveness) and /readyz
(readiness of the synchronous path), /v1/models, /metrics and the docs. Every route but the two probes needs an
API key when keys are configured. `build_api` assembles one app per Gateway replica around its Gateway.
"""

import io
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gap3d.trellis import MEDIA_TYPES
from serve import hunyuan
from serve.api import ApiError, GenerateRequest
from serve.auth import Caller, caller
from serve.errors import install_exception_handlers
from serve.middleware import InFlightCap, RequestAccounting, StageTimingHeaders, UploadGuard
from serve.service import Gateway


def current_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(current_gateway)]
CallerDep = Annotated[Caller, Depends(caller)]
ASSET_RESPONSES = {200: {"content": {media: {} for media in MEDIA_TYPES.values()}}}

probes = APIRouter(tags=["probes"])
native = APIRouter(tags=["GAP3D API"], dependencies=[Depends(caller)])
hunyuan_api = APIRouter(tags=[hunyuan.TAG], dependencies=[Depends(caller)])
docs = APIRouter(dependencies=[Depends(caller)], include_in_schema=False)


def asset_response(request: Request, result, file_format: str) -> Response:
    request.state.generation = result  # StageTimingHeaders writes its timings
    return Response(result.asset, media_type=MEDIA_TYPES[file_format])


@probes.get("/healthz")
async def healthz() -> dict:
    """Liveness: answered by the Gateway alone, never behind uploads or generation. Needs no API key."""
    return {"status": "alive"}


@probes.get("/readyz", responses={503: {"description": "a stage the synchronous path needs has no running replica"}})
async def readyz(gateway: GatewayDep) -> JSONResponse:
    """Readiness of the synchronous path: each stage has a running replica, in snapshots of Serve's and Ray's views
    (serve/readiness.py). Needs no API key."""
    ready, body = gateway.readiness()
    return JSONResponse(body, status_code=200 if ready else 503, headers={} if ready else {"Retry-After": "2"})


@native.post("/v1/generate", response_class=Response, responses=ASSET_RESPONSES)
async def generate(body: GenerateRequest, request: Request, gateway: GatewayDep) -> Response:
    """Prompt (+ optional image) -> 3D asset bytes; per-stage timings in X-Timing-* headers; 503 + Retry-After when
    full."""
    result = await gateway.generate(await gateway.checked(body))
    return asset_response(request, result, body.format)


@native.post("/v1/embed", response_class=Response, responses={200: {"content": {"application/x-npy": {}}}})
async def embed(body: GenerateRequest, request: Request, gateway: GatewayDep) -> Response:
    """Prompt (+ optional image) -> aligned DINOv2 tokens (N, D) float32 as .npy bytes."""
    result = await gateway.embed(await gateway.checked(body))
    request.state.generation = result
    buffer = io.BytesIO()
    np.save(buffer, result.tokens.astype(np.float32))
    return Response(buffer.getvalue(), media_type="application/x-npy")


@native.post("/v1/jobs", status_code=202)
async def submit_job(
    body: GenerateRequest,
    gateway: GatewayDep,
    who: CallerDep,
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
) -> JSONResponse:
    """Queue a generation (same body as /v1/generate; optional Idempotency-Key header) -> 202 {id}; 429 +
    Retry-After past the key's job quota."""
    job_id, created = await gateway.submit(body, who, idempotency_key)
    headers = {"Location": f"/v1/jobs/{job_id}", **({} if created else {"Idempotent-Replayed": "true"})}
    return JSONResponse({"id": job_id}, status_code=202, headers=headers)


@native.get("/v1/jobs/{job_id}")
async def job_status(job_id: str, gateway: GatewayDep) -> dict:
    """queued / running (stage, progress) / succeeded / failed (error) / cancelled, with per-stage timings."""
    return (await gateway.known_job(job_id)).public()


@native.get("/v1/jobs/{job_id}/result", response_class=Response, responses=ASSET_RESPONSES)
async def job_result(job_id: str, gateway: GatewayDep) -> Response:
    """The asset of a succeeded job; 409 while it is not."""
    record = await gateway.known_job(job_id)
    asset = await gateway.result(record)
    if asset is None:
        raise ApiError(409, f"the job is {record.status}; it has no result", kind="bad_input")
    return Response(asset, media_type=MEDIA_TYPES[record.file_format])


@native.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, gateway: GatewayDep) -> dict:
    """Cancel a queued or running job (a running one stops at its next sampler step); an ended job stays as it
    is."""
    return (await gateway.cancel(job_id)).public()


@native.get("/v1/models")
async def models(gateway: GatewayDep) -> dict:
    """What each stage has loaded, from where, and the trained run's config."""
    return await gateway.models()


@native.get("/metrics", response_class=Response)
async def metrics(gateway: GatewayDep) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@hunyuan_api.post("/generate", response_class=Response, responses=ASSET_RESPONSES)
async def hunyuan_generate(body: hunyuan.HunyuanRequest, request: Request, gateway: GatewayDep) -> Response:
    """Hunyuan3D-2's synchronous route: {text | image, seed, num_inference_steps, guidance_scale, face_count, type}
    -> file bytes."""
    mapped = hunyuan.to_generate_request(body)
    result = await gateway.generate(await gateway.checked(mapped))
    return asset_response(request, result, mapped.format)


@hunyuan_api.post("/send")
async def hunyuan_send(body: hunyuan.HunyuanRequest, gateway: GatewayDep, who: CallerDep) -> dict:
    """Hunyuan3D-2's async submit -> {"uid"}; poll GET /status/{uid}."""
    job_id, _ = await gateway.submit(hunyuan.to_generate_request(body), who, None)
    return {"uid": job_id}


@hunyuan_api.get("/status/{uid}")
async def hunyuan_status(uid: str, gateway: GatewayDep) -> JSONResponse:
    """Hunyuan3D-2's poll: processing / completed (model_base64) / error."""
    record = await gateway.job(uid)
    body, status = hunyuan.status_body(record, record and await gateway.result(record))
    return JSONResponse(body, status_code=status)


@docs.get("/openapi.json")
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@docs.get("/docs")
async def swagger_ui() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="GAP3D API")


@docs.get("/redoc")
async def redoc() -> HTMLResponse:
    return get_redoc_html(openapi_url="/openapi.json", title="GAP3D API")


def build_api(gateway: Gateway, api_keys: frozenset[str]) -> FastAPI:
    """The FastAPI app of one Gateway replica."""
    api = FastAPI(
        title="GAP3D",
        version="1",
        description="Text (+ image) to 3D assets through a VLM aligned to DINOv2 space and TRELLIS.",
        docs_url=None,  # the docs routes above need a key like every route but the probes
        redoc_url=None,
        openapi_url=None,
    )
    api.state.gateway, api.state.api_keys = gateway, api_keys
    routers = (probes, native, hunyuan_api, docs)
    for router in routers:
        api.include_router(router)
    install_exception_handlers(api)
    # Starlette runs the middleware added last first: accounting sees every answer, refusals included.
    api.add_middleware(StageTimingHeaders)
    api.add_middleware(UploadGuard, limits=gateway.limits, metrics=gateway.metrics)
    api.add_middleware(InFlightCap, limits=gateway.limits)
    api.add_middleware(
        RequestAccounting, metrics=gateway.metrics, routes=[r for router in routers for r in router.routes]
    )
    return api
