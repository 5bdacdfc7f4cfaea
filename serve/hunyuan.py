"""Hunyuan3D-2's HTTP API (its api_server.py) on the GAP3D service, so its clients and Blender add-on work unchanged.

    POST /generate      JSON -> the asset file's bytes
    POST /send          JSON -> {"uid": "..."}, an async job (serve/jobs.py)
    GET  /status/{uid}  -> {"status": "processing" | "completed" | "error"}, with "model_base64" once completed

Fields: text -> prompt; image (base64) -> the prompt image, with the text or alone (then IMAGE_ONLY_PROMPT is the
text); seed -> seed (Hunyuan's default 1234); num_inference_steps -> aligner sampling steps; guidance_scale ->
cfg_scale; face_count -> target_faces; type -> format (glb, obj or ply). Accepted and ignored: octree_resolution
(TRELLIS has no octree), texture, mesh and remove_background (GAP3D makes shapes, not textures), and any other field.
Errors keep Hunyuan's body ({"text": ..., "error_code": 1}) with GAP3D's status codes (serve/errors.py).
"""

import base64
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serve.api import MIN_TARGET_FACES, GenerateRequest, bad_input
from serve.jobs import JobRecord

IMAGE_ONLY_PROMPT = "the object in the image"
ROUTES = ("/generate", "/send", "/status/")  # paths (or path prefixes) that answer in Hunyuan's shape
TAG = "Hunyuan3D-2 API"


def is_hunyuan_path(path: str) -> bool:
    return path in ROUTES[:2] or path.startswith(ROUTES[2])


class HunyuanRequest(BaseModel):
    """The body of /generate and /send: the fields GAP3D uses are typed strictly; any other is ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)  # Hunyuan clients send fields GAP3D has no use for

    text: str | None = Field(default=None, description="the prompt")
    image: str | None = Field(default=None, description="prompt image: base64, or a data: URL")
    seed: int = Field(default=1234, ge=0, lt=2**31)
    num_inference_steps: int | None = Field(default=None, ge=1, description="aligner sampling steps")
    guidance_scale: float | None = Field(default=None, ge=0.0, allow_inf_nan=False, description="cfg_scale")
    face_count: int | None = Field(default=None, ge=MIN_TARGET_FACES, description="about this many faces at most")
    type: Literal["glb", "obj", "ply"] = Field(default="glb", description="asset file format")


def to_generate_request(request: HunyuanRequest) -> GenerateRequest:
    """A Hunyuan3D-2 request -> GAP3D's GenerateRequest; 422 when it has neither text nor image."""
    if not (request.text or "").strip() and not request.image:
        raise bad_input("give text, image or both", "text")
    return GenerateRequest(
        prompt=request.text if (request.text or "").strip() else IMAGE_ONLY_PROMPT,
        image=request.image,
        seed=request.seed,
        steps=request.num_inference_steps,
        cfg_scale=request.guidance_scale,
        format=request.type,
        target_faces=request.face_count,
    )


def status_body(record: JobRecord | None, result: bytes | None) -> tuple[dict, int]:
    """GET /status/{uid}'s body and status code for a job record (None: unknown uid)."""
    if record is None:
        return {"status": "error", "message": "unknown uid (or its result has expired)"}, 404
    if record.status == "succeeded" and result is not None:
        return {"status": "completed", "model_base64": base64.b64encode(result).decode()}, 200
    if record.status in ("failed", "cancelled"):
        return {"status": "error", "message": record.error or record.status}, 200
    return {"status": "processing", "stage": record.stage, "progress": record.progress}, 200
