"""Hunyuan3D-2's HTTP API (its api_server.py) on the GAP3D service, so its clients and Blender add-on work unchanged.

    POST /generate      JSON -> the asset file's bytes
    POST /send          JSON -> {"uid": "..."}, an async job (serve/jobs.py)
    GET  /status/{uid}  -> {"status": "processing" | "completed" | "error"}, with "model_base64" once completed

Fields: text -> prompt; image (base64) -> the prompt image, with the text or alone (then IMAGE_ONLY_PROMPT is the
text); seed -> seed (Hunyuan's default 1234); num_inference_steps -> aligner sampling steps; guidance_scale ->
cfg_scale; face_count -> target_faces; type -> format (glb, obj or ply). Accepted and ignored: octree_resolution
(TRELLIS has no octree), texture, mesh and remove_background (GAP3D makes shapes, not textures), and any other field.
Errors keep Hunyuan's body ({"text": ..., "error_code": 1}) with GAP3D's status codes.
"""

import base64
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from serve.api import ApiError, GenerateRequest, parse_body
from serve.jobs import JobRecord

IMAGE_ONLY_PROMPT = "the object in the image"


class HunyuanRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # Hunyuan clients send fields GAP3D has no use for

    text: str | None = None
    image: str | None = None
    seed: int = Field(default=1234, ge=0, lt=2**31)
    num_inference_steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = Field(default=None, ge=0.0)
    face_count: int | None = Field(default=None, ge=4)
    type: Literal["glb", "obj", "ply"] = "glb"


def to_generate_request(body: bytes) -> GenerateRequest:
    """A Hunyuan3D-2 request body -> GAP3D's GenerateRequest; 422 when it has neither text nor image."""
    request = parse_body(HunyuanRequest, body)
    if not (request.text or "").strip() and not request.image:
        raise ApiError(422, "give text, image or both", field="text", kind="bad_input")
    return GenerateRequest(
        prompt=request.text if (request.text or "").strip() else IMAGE_ONLY_PROMPT,
        image=request.image,
        seed=request.seed,
        steps=request.num_inference_steps,
        cfg_scale=request.guidance_scale,
        format=request.type,
        target_faces=request.face_count,
    )


def error_response(error: ApiError) -> JSONResponse:
    """Hunyuan's error body, with the status and headers (Retry-After) GAP3D chose."""
    return JSONResponse({"text": error.message, "error_code": 1}, status_code=error.status, headers=error.headers)


def status_body(record: JobRecord | None, result: bytes | None) -> tuple[dict, int]:
    """GET /status/{uid}'s body and status code for a job record (None: unknown uid)."""
    if record is None:
        return {"status": "error", "message": "unknown uid (or its result has expired)"}, 404
    if record.status == "succeeded" and result is not None:
        return {"status": "completed", "model_base64": base64.b64encode(result).decode()}, 200
    if record.status in ("failed", "cancelled"):
        return {"status": "error", "message": record.error or record.status}, 200
    return {"status": "processing", "stage": record.stage, "progress": record.progress}, 200
