"""HTTP surface of the GAP3D service: limits, request schema, validation, errors and API keys.

Nothing here touches a model; serve/gateway.py wires it to the deployments.
"""

import base64
import binascii
import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, Field, ValidationError

from gap3d.generation import decode_prompt_image

logger = logging.getLogger(__name__)
ModelT = TypeVar("ModelT", bound=BaseModel)

TIMING_PREFIX, TIMING_SUFFIX = "x-timing-", "-ms"  # per-stage milliseconds on every generation response


def stage_timing_headers(timings: dict[str, float]) -> dict[str, str]:
    """Seconds per stage -> X-Timing-<stage>-ms headers (underscores in stage names become hyphens)."""
    return {
        f"{TIMING_PREFIX}{stage.replace('_', '-')}{TIMING_SUFFIX}": f"{seconds * 1000:.1f}"
        for stage, seconds in timings.items()
    }


def stage_timings(headers) -> dict[str, float]:
    """A response's X-Timing-<stage>-ms headers -> seconds per stage (the inverse of stage_timing_headers)."""
    lowered = {name.lower(): value for name, value in headers.items()}
    return {
        name[len(TIMING_PREFIX) : -len(TIMING_SUFFIX)].replace("-", "_"): float(value) / 1000
        for name, value in lowered.items()
        if name.startswith(TIMING_PREFIX) and name.endswith(TIMING_SUFFIX)
    }


# Probes must work without a key (a kubelet has none); every other route, the docs included, needs one when auth is on.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


@dataclass
class ServeLimits:
    """What one request may ask for (the `limits:` builder arg in serve/config.yaml)."""

    max_prompt_chars: int = 2000  # longer prompts are rejected with 422
    max_image_pixels: int = 4096 * 4096  # larger prompt images are rejected with 413
    max_body_bytes: int = 32 * 1024 * 1024  # request body cap
    max_steps: int = 100  # upper bound on requested sampling steps
    max_cfg_scale: float = 20.0  # upper bound on requested guidance scale
    target_faces: int = 50_000  # served meshes are simplified to at most about this many faces
    deadline_s: float = (
        30.0  # a synchronous request ends by then: its asset, or 503 + Retry-After (work left is cancelled)
    )
    expected_decode_s: float = (
        2.0  # first estimate of one decode's compute time; admission then learns it from the Decoder
    )
    decoder_slots_per_replica: int = (
        1  # decodes one Decoder replica runs at once: keep equal to its max_ongoing_requests
    )

    def __post_init__(self):
        for name in ("deadline_s", "expected_decode_s", "decoder_slots_per_replica"):
            if getattr(self, name) <= 0:
                raise ValueError(f"limits.{name} must be > 0, got {getattr(self, name)}")


class GenerateRequest(BaseModel):
    prompt: str = Field(description="caption of the object to generate")
    image: str | None = Field(default=None, description="optional base64-encoded image joining the prompt (zero-shot)")
    seed: int = Field(default=0, ge=0, lt=2**31, description="seed of the aligner and TRELLIS noise")
    steps: int | None = Field(default=None, ge=1, description="aligner sampling steps (default: the trained config's)")
    cfg_scale: float | None = Field(
        default=None, ge=0.0, description="classifier-free guidance scale (default: the trained config's)"
    )
    format: Literal["glb", "obj", "ply"] = Field(default="glb", description="asset file format")
    target_faces: int | None = Field(
        default=None, ge=4, description="simplify the mesh to about this many faces (at most the service's limit)"
    )


class ApiError(Exception):
    """An error with an HTTP status, the request field (or pipeline stage) it concerns, and a kind for metrics."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        stage: str | None = None,
        headers: dict | None = None,
        kind: str = "failed",
    ):
        super().__init__(message)
        self.status, self.message, self.field, self.stage, self.headers, self.kind = (
            status,
            message,
            field,
            stage,
            headers or {},
            kind,
        )

    def __reduce__(self):  # raised in job runners and read back by the ingress: keep every field across pickling
        return (ApiError, (self.status, self.message, self.field, self.stage, self.headers, self.kind))

    def response(self) -> JSONResponse:
        body = {"error": self.message}
        body.update({key: value for key, value in (("field", self.field), ("stage", self.stage)) if value})
        return JSONResponse(body, status_code=self.status, headers=self.headers)


async def read_body(request: Request, max_body_bytes: int) -> bytes:
    """The request body, refused with 413 past the cap (declared or actual) before it is parsed."""
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > max_body_bytes:
        raise ApiError(413, f"request body is larger than {max_body_bytes} bytes", field="body", kind="bad_input")
    body = await request.body()
    if len(body) > max_body_bytes:
        raise ApiError(413, f"request body is larger than {max_body_bytes} bytes", field="body", kind="bad_input")
    return body


def parse_body(model: type[ModelT], body: bytes) -> ModelT:
    """Schema validation; errors name the first offending field and never echo the input."""
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first.get("loc", ())) or "body"
        raise ApiError(422, first.get("msg", "invalid request"), field=field, kind="bad_input") from None


def check_generate_request(request: GenerateRequest, limits: ServeLimits):
    """Range and size checks beyond the schema; returns the decoded prompt image (or None)."""
    if not request.prompt.strip():
        raise ApiError(422, "prompt must not be empty", field="prompt", kind="bad_input")
    if len(request.prompt) > limits.max_prompt_chars:
        raise ApiError(
            422, f"prompt is longer than {limits.max_prompt_chars} characters", field="prompt", kind="bad_input"
        )
    if request.steps is not None and request.steps > limits.max_steps:
        raise ApiError(422, f"steps must be at most {limits.max_steps}", field="steps", kind="bad_input")
    if request.cfg_scale is not None and request.cfg_scale > limits.max_cfg_scale:
        raise ApiError(422, f"cfg_scale must be at most {limits.max_cfg_scale}", field="cfg_scale", kind="bad_input")
    if request.image is None:
        return None
    try:
        data = base64.b64decode(request.image, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "image is not valid base64", field="image", kind="bad_input") from None
    try:
        return decode_prompt_image(data, limits.max_image_pixels)
    except OverflowError as error:
        raise ApiError(413, str(error), field="image", kind="bad_input") from None
    except ValueError as error:
        raise ApiError(422, f"image is {error}", field="image", kind="bad_input") from None


@dataclass
class GenerationInputs:
    """A validated request, whichever route it came through."""

    prompt: str
    image: Image.Image | None
    seed: int
    steps: int
    cfg_scale: float
    file_format: str
    target_faces: int


def generation_inputs(body: GenerateRequest, limits: ServeLimits, flow: dict) -> GenerationInputs:
    """Check a parsed request against the limits and fill in the trained config's defaults (flow: its `flow` "
    "section)."""
    image = check_generate_request(body, limits)
    return GenerationInputs(
        prompt=body.prompt,
        image=image,
        seed=body.seed,
        steps=body.steps or flow["sample_steps"],
        cfg_scale=flow["cfg_scale"] if body.cfg_scale is None else body.cfg_scale,
        file_format=body.format,
        target_faces=limits.target_faces if body.target_faces is None else min(body.target_faces, limits.target_faces),
    )


def load_api_keys(keys_file: str | None, keys_env: str | None) -> frozenset[str]:
    """Bearer tokens from a file (one per line: a mounted secret) and/or the variable `keys_env`; none = auth off.

    Both are named in the Serve config, never taken from whoever runs `serve run`; a named source that is missing
    fails the replica's start, so a typo cannot silently open the service.
    """
    keys: set[str] = set()
    if keys_file:
        path = Path(keys_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"api_keys_file {path} does not exist on this node; mount the secret there or fix the path in the "
                "Serve config"
            )
        keys |= {line.strip() for line in path.read_text().splitlines() if line.strip()}
    if keys_env:
        if keys_env not in os.environ:
            raise KeyError(
                f"api_keys_env names ${keys_env}, which the Gateway's environment lacks; set it in the deployment's "
                "runtime_env env_vars or the pod"
            )
        keys |= {key.strip() for key in os.environ[keys_env].split(",") if key.strip()}
    if (keys_file or keys_env) and not keys:
        raise ValueError(f"the configured API key source ({keys_file or '$' + keys_env}) holds no key")
    return frozenset(keys)


def authorized(request: Request, keys: frozenset[str]) -> bool:
    """True when auth is off, the path is open, or the request carries one of the bearer tokens."""
    if not keys or request.url.path in OPEN_PATHS:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # Bytes, not str: compare_digest refuses non-ASCII str, and any malformed credential must be a 401, not a 500.
    offered = token.strip().encode("utf-8", "surrogateescape")
    return scheme.lower() == "bearer" and any(hmac.compare_digest(offered, key.encode("utf-8")) for key in keys)
