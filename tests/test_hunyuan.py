"""Hunyuan3D-2's request fields mapped onto GAP3D's, and its status bodies (in-process)."""

import json

import pytest
from pydantic import ValidationError

from serve.api import ApiError
from serve.errors import validation_field
from serve.hunyuan import IMAGE_ONLY_PROMPT, HunyuanRequest, status_body, to_generate_request
from serve.jobs import JobRecord


def mapped(**fields):
    """What the /generate and /send routes do with a JSON body: FastAPI validates it, then it is mapped."""
    return to_generate_request(HunyuanRequest.model_validate_json(json.dumps(fields)))


def refused_field(**fields) -> tuple[int, str]:
    """(status, field) of the 422 a Hunyuan body gets, from the schema or from the mapping."""
    try:
        mapped(**fields)
    except ValidationError as error:
        return 422, validation_field(error.errors()[0]["loc"])
    except ApiError as error:
        return error.status, error.field
    raise AssertionError(f"{fields} was accepted")


def test_a_text_request_maps_every_field_that_has_a_meaning_here():
    request = mapped(
        text="a wooden chair", seed=7, num_inference_steps=12, guidance_scale=4.5, face_count=20000, type="obj"
    )
    assert (request.prompt, request.seed, request.steps, request.cfg_scale, request.target_faces, request.format) == (
        "a wooden chair",
        7,
        12,
        4.5,
        20000,
        "obj",
    )


def test_hunyuan_defaults_apply_when_fields_are_left_out():
    request = mapped(text="a chair")
    assert (request.seed, request.steps, request.cfg_scale, request.format, request.target_faces) == (
        1234,
        None,
        None,
        "glb",
        None,
    )


def test_an_image_alone_gets_the_image_only_prompt():
    request = mapped(image="aGVsbG8=")
    assert (request.prompt, request.image) == (IMAGE_ONLY_PROMPT, "aGVsbG8=")


def test_fields_gap3d_has_no_use_for_are_accepted():
    assert (
        mapped(text="a chair", octree_resolution=256, texture=True, remove_background=False, mesh="...").prompt
        == "a chair"
    )


@pytest.mark.parametrize(
    "fields, field",
    [
        ({}, "text"),
        ({"text": "  "}, "text"),
        ({"text": "a", "type": "fbx"}, "type"),
        ({"text": "a", "seed": -1}, "seed"),
        ({"text": "a", "seed": True}, "seed"),
        ({"text": "a", "num_inference_steps": "10"}, "num_inference_steps"),
        ({"text": "a", "face_count": 8}, "face_count"),
    ],
)
def test_a_request_without_a_prompt_or_with_a_bad_field_is_a_422_naming_it(fields, field):
    assert refused_field(**fields) == (422, field)


def record(status: str, error: str | None = None) -> JobRecord:
    return JobRecord(
        id="0" * 32, request_sha256="", file_format="glb", created_at=0.0, queued_at=0.0, status=status, error=error
    )


def test_status_is_processing_while_the_job_is_queued_or_running():
    assert status_body(record("queued"), None)[0]["status"] == "processing"
    assert status_body(record("running"), None)[0]["status"] == "processing"


def test_status_completed_carries_the_model_in_base64():
    body, code = status_body(record("succeeded"), b"glb bytes")
    assert (code, body) == (200, {"status": "completed", "model_base64": "Z2xiIGJ5dGVz"})


def test_a_failed_job_and_an_unknown_uid_are_errors():
    assert status_body(record("failed", "the decoder stage failed"), None) == (
        {"status": "error", "message": "the decoder stage failed"},
        200,
    )
    assert status_body(None, None)[1] == 404
