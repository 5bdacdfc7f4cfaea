"""HTTP surface of the GAP3D service: request schema, validation, errors, API keys and Prometheus metrics.

Nothing here touches a model; serve/app.py wires it to the deployments.
"""

import base64
import binascii
import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel, Field, ValidationError

from gap3d.generation import decode_prompt_image

API_KEYS_ENV = "GAP3D_API_KEYS"  # comma-separated bearer tokens
API_KEYS_FILE_ENV = "GAP3D_API_KEYS_FILE"  # file with one bearer token per line
OPEN_PATHS = frozenset({"/healthz"})


@dataclass
class ServeLimits:
    """What one request may ask for (the `limits:` builder arg in serve/config.yaml)."""

    max_prompt_chars: int = 2000  # longer prompts are rejected with 422
    max_image_pixels: int = 4096 * 4096  # larger prompt images are rejected with 413
    max_body_bytes: int = 32 * 1024 * 1024  # request body cap
    max_steps: int = 100  # upper bound on requested sampling steps
    max_cfg_scale: float = 20.0  # upper bound on requested guidance scale
    target_faces: int = 50_000  # served meshes are simplified to at most about this many faces


class GenerateRequest(BaseModel):
    prompt: str = Field(description="caption of the object to generate")
    image: str | None = Field(default=None, description="optional base64-encoded image joining the prompt (zero-shot)")
    seed: int = Field(default=0, ge=0, lt=2**31, description="seed of the aligner and TRELLIS noise")
    steps: int | None = Field(default=None, ge=1, description="aligner sampling steps (default: the trained config's)")
    cfg_scale: float | None = Field(default=None, ge=0.0, description="classifier-free guidance scale (default: the trained config's)")
    format: Literal["glb", "obj", "ply"] = Field(default="glb", description="asset file format")


class ApiError(Exception):
    """An error with an HTTP status and the request field (or pipeline stage) it concerns."""

    def __init__(self, status: int, message: str, field: str | None = None, stage: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.stage, self.headers = status, message, field, stage, headers or {}

    def response(self) -> JSONResponse:
        body = {"error": self.message}
        body.update({key: value for key, value in (("field", self.field), ("stage", self.stage)) if value})
        return JSONResponse(body, status_code=self.status, headers=self.headers)


async def parse_generate_request(request: Request, max_body_bytes: int) -> GenerateRequest:
    """Body-size cap, then schema validation; errors name the first offending field, never echo the input."""
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > max_body_bytes:
        raise ApiError(413, f"request body is larger than {max_body_bytes} bytes", field="body")
    body = await request.body()
    if len(body) > max_body_bytes:
        raise ApiError(413, f"request body is larger than {max_body_bytes} bytes", field="body")
    try:
        return GenerateRequest.model_validate_json(body)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first.get("loc", ())) or "body"
        raise ApiError(422, first.get("msg", "invalid request"), field=field) from None


def check_generate_request(request: GenerateRequest, limits: ServeLimits):
    """Range and size checks beyond the schema; returns the decoded prompt image (or None)."""
    if not request.prompt.strip():
        raise ApiError(422, "prompt must not be empty", field="prompt")
    if len(request.prompt) > limits.max_prompt_chars:
        raise ApiError(422, f"prompt is longer than {limits.max_prompt_chars} characters", field="prompt")
    if request.steps is not None and request.steps > limits.max_steps:
        raise ApiError(422, f"steps must be at most {limits.max_steps}", field="steps")
    if request.cfg_scale is not None and request.cfg_scale > limits.max_cfg_scale:
        raise ApiError(422, f"cfg_scale must be at most {limits.max_cfg_scale}", field="cfg_scale")
    if request.image is None:
        return None
    try:
        data = base64.b64decode(request.image, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "image is not valid base64", field="image") from None
    try:
        return decode_prompt_image(data, limits.max_image_pixels)
    except OverflowError as error:
        raise ApiError(413, str(error), field="image") from None
    except ValueError as error:
        raise ApiError(422, f"image is {error}", field="image") from None


def load_api_keys() -> frozenset[str]:
    """Bearer tokens from $GAP3D_API_KEYS and/or the file named by $GAP3D_API_KEYS_FILE; empty = auth off."""
    keys = {key.strip() for key in os.environ.get(API_KEYS_ENV, "").split(",") if key.strip()}
    key_file = os.environ.get(API_KEYS_FILE_ENV)
    if key_file:
        keys |= {line.strip() for line in Path(key_file).read_text().splitlines() if line.strip()}
    return frozenset(keys)


def authorized(request: Request, keys: frozenset[str]) -> bool:
    """True when auth is off, the path is open, or the request carries one of the bearer tokens."""
    if not keys or request.url.path in OPEN_PATHS:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # Bytes, not str: compare_digest refuses non-ASCII str, and any malformed credential must be a 401, not a 500.
    offered = token.strip().encode("utf-8", "surrogateescape")
    return scheme.lower() == "bearer" and any(hmac.compare_digest(offered, key.encode("utf-8")) for key in keys)


class ServiceMetrics:
    """The ingress's Prometheus metrics, in a registry of its own (scraped at /metrics)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("gap3d_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry)
        self.in_flight = Gauge("gap3d_requests_in_flight", "requests being processed", registry=self.registry)
        self.stage_seconds = Histogram(
            "gap3d_stage_seconds", "latency of each pipeline stage as seen by the ingress", ["stage"], registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.batch_size = Histogram(
            "gap3d_aligner_batch_size", "size of the Aligner batch each request was served in", registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
