"""Hunyuan3D-2's routes over real HTTP, as its api_server's clients call them: /generate, /send, /status/{uid}."""

import base64
import io
import time

import httpx
import trimesh

from serve.api import MIN_TARGET_FACES
from tests.serving import SEED, post, wait_for
from tests.test_serve import png_base64


def test_generate_with_text_returns_the_file_bytes(service):
    response = post(
        service,
        "/generate",
        {"text": "a small red cone", "seed": SEED, "octree_resolution": 256, "texture": False, "type": "glb"},
    )
    assert response.status_code == 200, response.text
    assert len(trimesh.load(io.BytesIO(response.content), file_type="glb", force="mesh").faces) > 0


def test_generate_with_an_image_alone_returns_the_file_bytes(service):
    response = post(service, "/generate", {"image": png_base64(), "seed": SEED, "type": "ply"})
    assert response.status_code == 200, response.text
    assert len(trimesh.load(io.BytesIO(response.content), file_type="ply").faces) > 0


def test_face_count_caps_the_faces_of_the_mesh(service):
    many = post(service, "/generate", {"text": "a large cube", "seed": SEED})
    few = post(service, "/generate", {"text": "a large cube", "seed": SEED, "face_count": MIN_TARGET_FACES})
    faces = [len(trimesh.load(io.BytesIO(r.content), file_type="glb", force="mesh").faces) for r in (many, few)]
    assert 0 < faces[1] <= MIN_TARGET_FACES < faces[0]


def test_a_request_without_text_or_image_gets_hunyuans_error_body(service):
    response = post(service, "/generate", {"seed": 3})
    assert response.status_code == 422 and response.json()["error_code"] == 1 and response.json()["text"]


def test_send_then_status_completes_with_the_model_in_base64(service):
    uid = post(service, "/send", {"text": "a medium green sphere", "seed": 5, "type": "glb"}).json()["uid"]
    deadline = time.monotonic() + 120

    def completed():
        body = httpx.get(f"{service}/status/{uid}", headers={"Authorization": "Bearer test-key-123"}, timeout=10).json()
        assert body["status"] != "error", body
        assert time.monotonic() < deadline
        return body if body["status"] == "completed" else None

    body = wait_for(completed, timeout_s=120, interval_s=0.5, what="the /send job completing")
    mesh = trimesh.load(io.BytesIO(base64.b64decode(body["model_base64"])), file_type="glb", force="mesh")
    assert len(mesh.faces) > 0


def test_status_of_an_unknown_uid_is_an_error(service):
    response = httpx.get(f"{service}/status/{'0' * 32}", headers={"Authorization": "Bearer test-key-123"}, timeout=10)
    assert (response.status_code, response.json()["status"]) == (404, "error")


def test_a_bad_field_gets_hunyuans_error_body(service):
    response = post(service, "/generate", {"text": "a cone", "type": "fbx"})
    assert response.status_code == 422 and set(response.json()) == {"text", "error_code"}


def test_a_face_count_below_what_a_mesh_needs_is_refused(service):
    response = post(service, "/generate", {"text": "a cone", "face_count": 8})
    assert response.status_code == 422 and response.json()["error_code"] == 1


def test_send_refuses_a_prompt_over_the_token_limit(service):
    response = post(service, "/send", {"text": "word " * 300})
    assert response.status_code == 422 and "tokens" in response.json()["text"]
