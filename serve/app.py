"""GAP3D on Ray Serve: PromptEncoder -> Aligner (batched) -> Decoder behind one FastAPI ingress.

`serve run serve/config.yaml` builds the application with `app(args)`; replica counts, autoscaling,
`max_ongoing_requests` and `ray_actor_options` come from that YAML, not from this file.
"""

import asyncio
import io
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from gap3d.config import load_config
from gap3d.export import CONFIG_NAME, find_export_dir, load_export
from gap3d.generation import align, check_decoder_matches, load_prompt_encoder
from gap3d.prompt_encoder import PromptTooLongError
from gap3d.trellis import MEDIA_TYPES, EmptyStructureError, export_mesh
from gap3d.trellis import Decoder as TrellisDecoder
from serve.api import ApiError, GenerateRequest, ServeLimits, ServiceMetrics, authorized, check_generate_request, load_api_keys, parse_generate_request

logger = logging.getLogger(__name__)


@dataclass
class AlignRequest:
    cond: np.ndarray  # (s, d_vlm) float32
    seed: int
    steps: int
    cfg_scale: float


@serve.deployment
class PromptEncoder:
    """Frozen VLM + trained soft tokens: prompt (+ image) -> (s, d_vlm) latents."""

    def __init__(self, export_uri: str, vlm_path: str | None = None):
        export = load_export(export_uri, with_aligner=False)
        self.encoder = load_prompt_encoder(export, vlm_path)
        self.info = {"vlm": self.encoder.config.path, "soft_tokens": list(self.encoder.soft_tokens.shape), "trained_soft_tokens": export.soft_tokens is not None}

    def ready(self) -> dict:
        return self.info

    def encode(self, prompt: str, image=None) -> np.ndarray:
        with torch.no_grad():
            return self.encoder([prompt], None if image is None else [image])[0].float().numpy()  # (s, d_vlm)


@serve.deployment
class Aligner:
    """AlignerDiT sampler; concurrent requests are batched, each keeping its own seed's noise."""

    def __init__(self, export_uri: str, max_batch_size: int, batch_wait_timeout_s: float):
        self.export = load_export(export_uri)
        self.align_batch.set_max_batch_size(max_batch_size)
        self.align_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        flow = self.export.config.flow
        self.info = {"export": export_uri, "step": self.export.step, "default_steps": flow.sample_steps, "default_cfg_scale": flow.cfg_scale}

    def ready(self) -> dict:
        return self.info

    def _align_group(self, requests: list[AlignRequest]) -> np.ndarray:
        cond = torch.from_numpy(np.stack([r.cond for r in requests]))
        first = requests[0]
        return align(self.export, cond, [r.seed for r in requests], first.steps, first.cfg_scale).numpy()

    @serve.batch  # size and wait are set per replica from serve/config.yaml (`aligner_batch:`)
    async def align_batch(self, requests: list[AlignRequest]) -> list[tuple[np.ndarray, int]]:
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault((request.steps, request.cfg_scale), []).append(index)
        results: list = [None] * len(requests)
        for indices in groups.values():
            # A worker thread keeps the replica's event loop free to gather the next batch meanwhile.
            tokens = await asyncio.to_thread(self._align_group, [requests[i] for i in indices])
            for row, index in enumerate(indices):
                results[index] = (tokens[row], len(requests))
        return results

    async def __call__(self, request: AlignRequest) -> tuple[np.ndarray, int]:
        return await self.align_batch(request)


@serve.deployment
class Decoder:
    """TRELLIS: (N, D) tokens -> asset bytes."""

    def __init__(self, trellis_uri: str, export_uri: str, target_faces: int, stages: str):
        self.decoder = TrellisDecoder.from_pretrained(trellis_uri, stages=stages)
        check_decoder_matches(load_export(export_uri, with_aligner=False), self.decoder)
        self.target_faces = target_faces
        self.info = {"trellis": trellis_uri, "cond_dim": self.decoder.cond_dim, "stage": self.decoder.default_stage, "target_faces": target_faces}

    def ready(self) -> dict:
        return self.info

    def decode(self, tokens: np.ndarray, seed: int, file_format: str) -> bytes:
        mesh = self.decoder.generate(torch.from_numpy(tokens)[None], seed=seed)[0]
        return export_mesh(mesh, file_format, self.target_faces)


api = FastAPI(title="GAP3D", version="1", description="Text (+ image) to 3D assets through a VLM aligned to DINOv2 space and TRELLIS.")


REQUEST_BODY_DOC = {"requestBody": {"required": True, "content": {"application/json": {"schema": GenerateRequest.model_json_schema()}}}}


class StageTimer:
    """Runs one stage call, times it, and turns its failures into ApiErrors that name the stage."""

    def __init__(self, metrics: ServiceMetrics, timings: dict):
        self.metrics, self.timings = metrics, timings

    async def __call__(self, stage: str, response):
        start = time.perf_counter()
        try:
            result = await response
        except BackPressureError:
            raise ApiError(503, f"the {stage} stage is overloaded; retry later", stage=stage, headers={"Retry-After": "2"}) from None
        except PromptTooLongError:
            # str() of the wrapped error would carry the replica's traceback; never send that to clients.
            raise ApiError(422, "prompt has more tokens than the VLM's vlm.max_prompt_tokens allows", field="prompt", stage=stage) from None
        except EmptyStructureError:
            raise ApiError(422, "the decoded 3D structure is empty; try another seed or prompt", stage=stage) from None
        except Exception:
            logger.exception("stage %s failed", stage)
            raise ApiError(500, f"the {stage} stage failed", stage=stage) from None
        elapsed = time.perf_counter() - start
        self.metrics.stage_seconds.labels(stage).observe(elapsed)
        self.timings[stage] = elapsed
        return result


@serve.deployment
@serve.ingress(api)
class Gateway:
    """FastAPI ingress composing the three stages through DeploymentHandles."""

    def __init__(self, prompt_encoder: DeploymentHandle, aligner: DeploymentHandle, decoder: DeploymentHandle, limits: dict, config: dict):
        self.handles = {"prompt_encoder": prompt_encoder, "aligner": aligner, "decoder": decoder}
        self.limits = ServeLimits(**limits)
        self.config = config
        self.metrics = ServiceMetrics()
        self.api_keys = load_api_keys()

    async def _respond(self, request: Request, route: str, handler) -> Response:
        """API keys, request metrics and ApiError -> JSON, around every route's handler."""
        self.metrics.in_flight.inc()
        try:
            if authorized(request, self.api_keys):
                response = await handler()
            else:
                response = JSONResponse({"error": "missing or invalid API key"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        except ApiError as error:
            response = error.response()
        finally:
            self.metrics.in_flight.dec()
        self.metrics.requests.labels(route, str(response.status_code)).inc()
        return response

    async def _tokens(self, request: Request, timings: dict) -> tuple[GenerateRequest, np.ndarray, int]:
        body = await parse_generate_request(request, self.limits.max_body_bytes)
        image = check_generate_request(body, self.limits)
        flow = self.config["flow"]
        steps = body.steps or flow["sample_steps"]
        cfg_scale = flow["cfg_scale"] if body.cfg_scale is None else body.cfg_scale
        run = StageTimer(self.metrics, timings)
        cond = await run("prompt_encoder", self.handles["prompt_encoder"].encode.remote(body.prompt, image))
        tokens, batch_size = await run("aligner", self.handles["aligner"].remote(AlignRequest(cond, body.seed, steps, cfg_scale)))
        self.metrics.batch_size.observe(batch_size)
        return body, tokens, batch_size

    @staticmethod
    def _timing_headers(timings: dict, batch_size: int) -> dict:
        headers = {f"X-Timing-{stage.replace('_', '-')}-ms": f"{seconds * 1000:.1f}" for stage, seconds in timings.items()}
        return {**headers, "X-Aligner-Batch-Size": str(batch_size)}

    @api.post("/v1/generate", response_class=Response, openapi_extra=REQUEST_BODY_DOC,
              responses={200: {"content": {"model/gltf-binary": {}, "model/obj": {}, "application/ply": {}}}})
    async def generate(self, request: Request) -> Response:
        """Prompt (+ optional image) -> 3D asset bytes; per-stage timings in X-Timing-* headers."""

        async def handler():
            timings: dict = {}
            body, tokens, batch_size = await self._tokens(request, timings)
            asset = await StageTimer(self.metrics, timings)("decoder", self.handles["decoder"].decode.remote(tokens, body.seed, body.format))
            return Response(asset, media_type=MEDIA_TYPES[body.format], headers=self._timing_headers(timings, batch_size))

        return await self._respond(request, "/v1/generate", handler)

    @api.post("/v1/embed", response_class=Response, openapi_extra=REQUEST_BODY_DOC, responses={200: {"content": {"application/x-npy": {}}}})
    async def embed(self, request: Request) -> Response:
        """Prompt (+ optional image) -> aligned DINOv2 tokens (N, D) float32 as .npy bytes."""

        async def handler():
            timings: dict = {}
            _, tokens, batch_size = await self._tokens(request, timings)
            buffer = io.BytesIO()
            np.save(buffer, tokens.astype(np.float32))
            return Response(buffer.getvalue(), media_type="application/x-npy", headers=self._timing_headers(timings, batch_size))

        return await self._respond(request, "/v1/embed", handler)

    async def _readiness(self) -> dict:
        names = list(self.handles)
        infos = await asyncio.wait_for(asyncio.gather(*(self.handles[n].ready.remote() for n in names)), timeout=10)
        return dict(zip(names, infos))

    @api.get("/healthz")
    async def healthz(self, request: Request) -> JSONResponse:
        """200 once every stage has its model loaded, else 503. Needs no API key."""

        async def handler():
            try:
                await self._readiness()
            except Exception:
                return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
            return JSONResponse({"status": "ready"})

        return await self._respond(request, "/healthz", handler)

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        """What each stage has loaded, from where, and the trained run's config."""

        async def handler():
            return JSONResponse({"stages": await self._readiness(), "config": self.config})

        return await self._respond(request, "/v1/models", handler)

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        """Prometheus text format."""

        async def handler():
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        return await self._respond(request, "/metrics", handler)


class AppArgs(BaseModel):
    """Builder arguments (the `args:` of serve/config.yaml)."""

    export: str  # trained aligner export (or training checkpoint) directory or s3:// URI
    trellis: str  # TRELLIS checkpoint directory or s3:// URI
    vlm: str | None = None  # VLM checkpoint, overriding the one recorded in the export's config
    decoder_stages: str = "auto"  # TRELLIS stages to run: "auto" (all the checkpoint has), "coarse" or "full"
    limits: dict = {}  # serve.api.ServeLimits fields
    aligner_batch: dict = {"max_batch_size": 8, "batch_wait_timeout_s": 0.02}  # the Aligner's @serve.batch settings


def _expand(uri: str) -> str:
    return uri if "://" in uri else str(Path(uri).expanduser())


def app(args: dict) -> serve.Application:
    """Build the composed application from builder args."""
    parsed = AppArgs(**args)
    export, trellis = _expand(parsed.export), _expand(parsed.trellis)
    vlm = None if parsed.vlm is None else _expand(parsed.vlm)
    config = load_config(yaml_path=find_export_dir(export) / CONFIG_NAME)
    limits = ServeLimits(**parsed.limits)
    return Gateway.bind(
        PromptEncoder.bind(export, vlm),
        Aligner.bind(export, **parsed.aligner_batch),
        Decoder.bind(trellis, export, limits.target_faces, parsed.decoder_stages),
        asdict(limits),
        {**asdict(config), "artifacts": {"export": export, "trellis": trellis, "vlm": vlm or config.vlm.path}},
    )
