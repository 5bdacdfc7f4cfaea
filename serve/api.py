"""HTTP surface of the GAP3D service: limits, request schema, errors and the checks every request gets up front.

Nothing here touches a model; serve/service.py wires it to the deployments and serve/routes.py to FastAPI.
"""

import base64
import binascii
from dataclasses import dataclass
from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from gap3d.generation import decode_prompt_image

TIMING_PREFIX, TIMING_SUFFIX = "x-timing-", "-ms"  # per-stage milliseconds on every generation response
# The smallest face budget a request may ask for: below about this, quadric decimation can collapse a decoded
# shape to no faces at all.
MIN_TARGET_FACES = 100
CLIENT_GONE = 499  # status recorded for a request whose client went away before its answer (nginx's convention)


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


@dataclass
class ServeLimits:
    """What one request may ask for and take (the `limits:` builder arg in serve/config.yaml)."""

    max_prompt_chars: int = 2000  # cheap bound checked before tokenising; the real limit is vlm.max_prompt_tokens
    max_image_pixels: int = 4096 * 4096  # larger prompt images are rejected with 413, whatever their encoding
    max_body_bytes: int = 32 * 1024 * 1024  # request body cap, counted while the body streams in (413 past it)
    body_stall_s: float = 5.0  # an upload that sends nothing for this long gets 408 and its connection closed
    min_body_rate: float = 16384.0  # bytes/s an upload must average once it has run body_stall_s (else 408)
    # Requests (the probes aside) one Gateway replica holds at once; more get 503 + Retry-After at once. Keep it
    # below the Gateway's max_ongoing_requests: the difference is the room the probes and refusals always find.
    max_requests_in_flight: int = 1024
    image_decode_threads: int = 2  # threads decoding prompt images, so that the event loop never does
    max_steps: int = 100  # upper bound on requested sampling steps
    max_cfg_scale: float = 20.0  # upper bound on requested guidance scale
    target_faces: int = 50_000  # served meshes are simplified to at most about this many faces
    deadline_s: float = 30.0  # a synchronous request ends by then: its asset, or 503 + Retry-After
    expected_decode_s: float = 2.0  # first estimate of one decode's compute time; then learnt from the Decoder
    decoder_slots_per_replica: int = 1  # decodes one Decoder replica runs at once: its max_ongoing_requests

    def __post_init__(self):
        positive = (
            "max_prompt_chars",
            "max_image_pixels",
            "max_body_bytes",
            "body_stall_s",
            "min_body_rate",
            "max_requests_in_flight",
            "image_decode_threads",
            "deadline_s",
            "expected_decode_s",
            "decoder_slots_per_replica",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"limits.{name} must be > 0, got {getattr(self, name)}")
        if self.target_faces < MIN_TARGET_FACES:
            raise ValueError(f"limits.target_faces must be >= {MIN_TARGET_FACES}, got {self.target_faces}")


class GenerateRequest(BaseModel):
    """The body of /v1/generate, /v1/embed and /v1/jobs: strict types, and no field the service does not know."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(description="caption of the object to generate")
    image: str | None = Field(
        default=None, description="optional image joining the prompt (zero-shot): base64, or a data: URL"
    )
    seed: int = Field(default=0, ge=0, lt=2**31, description="seed of the aligner and TRELLIS noise")
    steps: int | None = Field(default=None, ge=1, description="aligner sampling steps (default: the trained config's)")
    cfg_scale: float | None = Field(
        default=None,
        ge=0.0,
        allow_inf_nan=False,
        description="classifier-free guidance scale (default: the trained config's)",
    )
    format: Literal["glb", "obj", "ply"] = Field(default="glb", description="asset file format")
    target_faces: int | None = Field(
        default=None,
        ge=MIN_TARGET_FACES,
        description="simplify the mesh to about this many faces (at most the service's limit)",
    )


class ApiError(HTTPException):
    """An HTTP error with the request field (or pipeline stage) it concerns and a kind for metrics.

    An HTTPException, so that FastAPI passes one raised while it reads a body (serve/middleware.py) to the
    exception handlers (serve/errors.py) like any other.
    """

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        stage: str | None = None,
        headers: dict | None = None,
        kind: str = "failed",
    ):
        super().__init__(status_code=status, detail=message, headers=headers or {})
        self.status, self.message, self.field, self.stage, self.kind = status, message, field, stage, kind

    def __reduce__(self):  # raised in job runners and read back by the ingress: keep every field across pickling
        return (ApiError, (self.status, self.message, self.field, self.stage, self.headers, self.kind))

    def __str__(self) -> str:
        return self.message


def bad_input(message: str, field: str, status: int = 422) -> ApiError:
    return ApiError(status, message, field=field, kind="bad_input")


def image_bytes(image: str) -> bytes:
    """A request's image field -> the encoded image: plain base64, or a data: URL carrying base64."""
    if image.startswith("data:"):
        header, comma, image = image.partition(",")
        if not comma or not header.endswith(";base64"):
            raise bad_input("image is a data: URL without base64 data (data:image/png;base64,...)", "image")
    try:
        return base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise bad_input("image is not valid base64 (nor a data: URL holding base64)", "image") from None


def check_request(request: GenerateRequest, limits: ServeLimits) -> None:
    """Range and size checks beyond the schema (cheap: no decoding)."""
    if not request.prompt.strip():
        raise bad_input("prompt must not be empty", "prompt")
    if len(request.prompt) > limits.max_prompt_chars:
        raise bad_input(f"prompt is longer than {limits.max_prompt_chars} characters", "prompt")
    if request.steps is not None and request.steps > limits.max_steps:
        raise bad_input(f"steps must be at most {limits.max_steps}", "steps")
    if request.cfg_scale is not None and request.cfg_scale > limits.max_cfg_scale:
        raise bad_input(f"cfg_scale must be at most {limits.max_cfg_scale}", "cfg_scale")


def decode_image(image: str, limits: ServeLimits) -> Image.Image:
    """The request's image decoded (seconds for a large one: call it off the event loop); 413 past the pixel limit."""
    try:
        return decode_prompt_image(image_bytes(image), limits.max_image_pixels)
    except OverflowError as error:
        raise bad_input(str(error), "image", status=413) from None
    except ValueError as error:
        raise bad_input(f"image is {error}", "image") from None


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
    """Every check but the token count, the image decoded (seconds for a large one: call this off the event loop),
    and the trained config's defaults filled in (flow: its `flow` section)."""
    check_request(body, limits)
    return GenerationInputs(
        prompt=body.prompt,
        image=None if body.image is None else decode_image(body.image, limits),
        seed=body.seed,
        steps=body.steps or flow["sample_steps"],
        cfg_scale=flow["cfg_scale"] if body.cfg_scale is None else body.cfg_scale,
        file_format=body.format,
        target_faces=limits.target_faces if body.target_faces is None else min(body.target_faces, limits.target_faces),
    )
