"""The composed GAP3D service over real HTTP: `serve run` of the shipped config against the session's Ray."""

import base64
import io
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
import trimesh
import yaml
from PIL import Image

from gap3d.build import build_aligner
from gap3d.export import save_export
from gap3d.generation import TextTo3D, align
from gap3d.tiny.trellis import write_tiny_trellis
from tests.conftest import free_port

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("serve_artifacts")
    aligner = build_aligner(tiny_config, seed=0)
    torch.nn.init.normal_(aligner.final_layer.linear.weight, std=0.05)  # a non-trivial velocity field
    save_export(root / "export", aligner.state_dict(), None, tiny_config, step=0)
    # Stage 1 only keeps each generation around a second; stage 2 has its own tests in test_trellis_full.py.
    write_tiny_trellis(root / "trellis", cond_dim=tiny_config.aligner.token_dim, stage2=False)
    return {"export": str(root / "export"), "trellis": str(root / "trellis")}


@pytest.fixture(scope="module")
def service(ray_cluster, artifacts, tmp_path_factory):
    """`serve run` of serve/config.yaml with this session's artifacts, a free port and API keys on."""
    from ray import serve

    config = yaml.safe_load(open("serve/config.yaml"))
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    application = config["applications"][0]
    application["args"].update(artifacts)
    gateway = next(d for d in application["deployments"] if d["name"] == "Gateway")
    gateway["ray_actor_options"]["runtime_env"] = {"env_vars": {"GAP3D_API_KEYS": API_KEY}}
    path = tmp_path_factory.mktemp("serve_config") / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    address = ray_cluster.get_runtime_context().gcs_address
    subprocess.run(["serve", "run", str(path), "--address", address, "--non-blocking"], check=True, timeout=300, capture_output=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise TimeoutError("the service did not become healthy within 240 s")
        yield base
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def in_process(artifacts):
    return TextTo3D.load(artifacts["export"], artifacts["trellis"])


def png_base64(size=(64, 48)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")  # one colour: even a huge image stays small
    return base64.b64encode(buffer.getvalue()).decode()


def post(service, route, body, headers=AUTH, timeout=120):
    return httpx.post(f"{service}{route}", json=body, headers=headers, timeout=timeout)


def test_generate_returns_a_glb_that_trimesh_loads_with_stage_timings(service):
    response = post(service, "/v1/generate", {"prompt": "a small red cone on the left", "seed": 3})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "model/gltf-binary"
    assert {"x-timing-prompt-encoder-ms", "x-timing-aligner-ms", "x-timing-decoder-ms"} <= set(response.headers)
    mesh = trimesh.load(io.BytesIO(response.content), file_type="glb", force="mesh")
    assert len(mesh.faces) > 0


def test_text_and_image_prompt_generates_a_ply(service):
    response = post(service, "/v1/generate", {"prompt": "a cube like this", "image": png_base64(), "format": "ply", "seed": 1})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/ply"
    assert len(trimesh.load(io.BytesIO(response.content), file_type="ply").faces) > 0


def test_embed_equals_the_three_stages_run_in_process_with_the_same_seed(service, in_process):
    response = post(service, "/v1/embed", {"prompt": "a large blue cube", "seed": 11, "steps": 6, "cfg_scale": 2.5})
    assert response.status_code == 200, response.text
    served = np.load(io.BytesIO(response.content))
    cond = in_process.prompt_encoder(["a large blue cube"])
    direct = align(in_process.export, cond, [11], steps=6, cfg_scale=2.5)[0]
    torch.testing.assert_close(torch.from_numpy(served), direct, atol=1e-4, rtol=1e-4)


def test_generate_equals_the_in_process_pipeline_byte_for_byte(service, in_process):
    body = {"prompt": "a medium green sphere", "seed": 5, "steps": 4}
    response = post(service, "/v1/generate", body)
    assert response.status_code == 200, response.text
    target_faces = yaml.safe_load(open("serve/config.yaml"))["applications"][0]["args"]["limits"]["target_faces"]
    # Ray starts fractional-CPU replicas with OMP_NUM_THREADS=1; another thread count reorders float sums.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        direct = in_process.generate("a medium green sphere", None, seed=5, steps=4, cfg_scale=in_process.export.config.flow.cfg_scale,
                                     file_format="glb", target_faces=target_faces)
    finally:
        torch.set_num_threads(threads)
    assert response.content == direct


def test_concurrent_requests_are_batched_by_the_aligner(service):
    bodies = [{"prompt": f"a red cone number {i}", "seed": i, "steps": 20} for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda body: post(service, "/v1/embed", body), bodies))
    assert all(r.status_code == 200 for r in responses)
    assert max(int(r.headers["x-aligner-batch-size"]) for r in responses) > 1


@pytest.mark.parametrize(
    "body, status, field",
    [
        ({"prompt": ""}, 422, "prompt"),
        ({"prompt": "   "}, 422, "prompt"),
        ({"prompt": "x" * 5000}, 422, "prompt"),
        ({"prompt": "word " * 300}, 422, "prompt"),  # under the character cap, over vlm.max_prompt_tokens
        ({}, 422, "prompt"),
        ({"prompt": "a cone", "image": "not base64!!"}, 422, "image"),
        ({"prompt": "a cone", "image": base64.b64encode(b"plain text, not an image").decode()}, 422, "image"),
        ({"prompt": "a cone", "image": png_base64((5000, 4000))}, 413, "image"),
        ({"prompt": "a cone", "steps": 0}, 422, "steps"),
        ({"prompt": "a cone", "steps": 10_000}, 422, "steps"),
        ({"prompt": "a cone", "cfg_scale": -1}, 422, "cfg_scale"),
        ({"prompt": "a cone", "cfg_scale": 1000}, 422, "cfg_scale"),
        ({"prompt": "a cone", "seed": -1}, 422, "seed"),
        ({"prompt": "a cone", "format": "fbx"}, 422, "format"),
    ],
)
def test_bad_input_gets_a_4xx_naming_the_field(service, body, status, field):
    response = post(service, "/v1/generate", body)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field
    assert "Traceback" not in response.text and "/work" not in response.text


def test_oversized_body_is_rejected_before_parsing(service):
    response = httpx.post(f"{service}/v1/generate", content=b"{" + b" " * (33 * 1024 * 1024) + b"}",
                          headers={**AUTH, "content-type": "application/json"}, timeout=60)
    assert response.status_code == 413


def test_requests_without_a_valid_key_get_401_but_healthz_stays_open(service):
    assert post(service, "/v1/generate", {"prompt": "a cone"}, headers={}).status_code == 401
    assert post(service, "/v1/generate", {"prompt": "a cone"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{service}/healthz", timeout=10).json() == {"status": "ready"}


def test_models_lists_each_stage_and_where_it_was_loaded_from(service, artifacts):
    models = httpx.get(f"{service}/v1/models", headers=AUTH, timeout=30).json()
    assert models["stages"]["decoder"]["trellis"] == artifacts["trellis"]
    assert models["stages"]["aligner"]["export"] == artifacts["export"]
    assert models["config"]["preset"] == "tiny"


def test_metrics_are_scrapeable_in_prometheus_format(service):
    post(service, "/v1/embed", {"prompt": "a cone", "steps": 2})
    text = httpx.get(f"{service}/metrics", headers=AUTH, timeout=30).text
    assert 'gap3d_requests_total{route="/v1/embed",status="200"}' in text
    assert "gap3d_stage_seconds_bucket" in text and "gap3d_aligner_batch_size_count" in text


def test_openapi_documents_the_versioned_routes(service):
    paths = httpx.get(f"{service}/openapi.json", headers=AUTH, timeout=30).json()["paths"]
    assert {"/v1/generate", "/v1/embed", "/v1/models", "/healthz"} <= set(paths)


@pytest.mark.parametrize("path", ["serve/config.yaml", "serve/config.gpu.yaml"])
def test_shipped_serve_configs_validate_and_name_every_deployment_of_the_app(path):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema(**yaml.safe_load(open(path)))
    application = schema.applications[0]
    assert application.import_path == "serve.app:app"
    assert {d.name for d in application.deployments} == {"Gateway", "PromptEncoder", "Aligner", "Decoder"}
