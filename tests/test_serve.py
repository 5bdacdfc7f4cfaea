"""The composed GAP3D service over real HTTP: `serve run` of the shipped config against the session's Ray
(tests/serving.py)."""

import base64
import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
import trimesh
import yaml
from PIL import Image

from gap3d.generation import TextTo3D, align
from tests.serving import AUTH, SEED, metric, post

DEPLOYMENTS = {
    "GatewayDeployment",
    "PromptEncoderDeployment",
    "AlignerDeployment",
    "DecoderDeployment",
    "JobRunnerDeployment",
}


@pytest.fixture(scope="module")
def in_process(serve_artifacts):
    return TextTo3D.load(serve_artifacts["export"], serve_artifacts["trellis"])


def png_base64(size=(64, 48)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")  # one colour: even a huge image stays small
    return base64.b64encode(buffer.getvalue()).decode()


def test_generate_returns_a_glb_that_trimesh_loads_with_stage_timings(service):
    response = post(service, "/v1/generate", {"prompt": "a small red cone on the left", "seed": SEED})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "model/gltf-binary"
    assert {"x-timing-prompt-encoder-ms", "x-timing-aligner-ms", "x-timing-decoder-ms"} <= set(response.headers)
    mesh = trimesh.load(io.BytesIO(response.content), file_type="glb", force="mesh")
    assert len(mesh.faces) > 0


def test_text_and_image_prompt_generates_a_ply(service):
    response = post(
        service, "/v1/generate", {"prompt": "a cube like this", "image": png_base64(), "format": "ply", "seed": 1}
    )
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
        direct = in_process.generate(
            "a medium green sphere",
            None,
            seed=5,
            steps=4,
            cfg_scale=in_process.export.config.flow.cfg_scale,
            file_format="glb",
            target_faces=target_faces,
        )
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
        ({"prompt": 7}, 422, "prompt"),
        ({"prompt": "a cone", "image": "not base64!!"}, 422, "image"),
        ({"prompt": "a cone", "image": base64.b64encode(b"plain text, not an image").decode()}, 422, "image"),
        ({"prompt": "a cone", "image": png_base64((5000, 4000))}, 413, "image"),
        ({"prompt": "a cone", "steps": 0}, 422, "steps"),
        ({"prompt": "a cone", "steps": 10_000}, 422, "steps"),
        ({"prompt": "a cone", "cfg_scale": -1}, 422, "cfg_scale"),
        ({"prompt": "a cone", "cfg_scale": 1000}, 422, "cfg_scale"),
        ({"prompt": "a cone", "seed": -1}, 422, "seed"),
        ({"prompt": "a cone", "seed": True}, 422, "seed"),
        ({"prompt": "a cone", "seed": 1.5}, 422, "seed"),
        ({"prompt": "a cone", "steps": "10"}, 422, "steps"),
        ({"prompt": "a cone", "cfg_scale": "3"}, 422, "cfg_scale"),
        ({"prompt": "a cone", "format": "fbx"}, 422, "format"),
        ({"prompt": "a cone", "target_faces": 4}, 422, "target_faces"),
        ({"prompt": "a cone", "target_faces": 8}, 422, "target_faces"),
        ({"prompt": "a cone", "stpes": 5}, 422, "stpes"),
        ({"prompt": "a cone", "image": "data:image/png,not-base64"}, 422, "image"),
    ],
)
def test_bad_input_gets_a_4xx_naming_the_field(service, body, status, field):
    response = post(service, "/v1/generate", body)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field
    assert "Traceback" not in response.text and "/work" not in response.text


def test_nan_is_refused_as_not_a_finite_number(service):
    response = httpx.post(
        f"{service}/v1/generate",
        content=b'{"prompt": "a cone", "cfg_scale": NaN}',
        headers={**AUTH, "content-type": "application/json"},
        timeout=30,
    )
    assert (response.status_code, response.json()["field"]) == (422, "cfg_scale")
    assert "finite" in response.json()["error"]


def test_an_unknown_field_name_is_not_echoed_at_length(service):
    response = post(service, "/v1/generate", {"prompt": "a cone", "x" * 10_000: 1})
    assert response.status_code == 422 and len(response.text) < 200


def png_claiming(width: int, height: int) -> str:
    """A PNG whose header claims width x height pixels (its data would not decode): a decompression bomb."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height, then its CRC
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return base64.b64encode(bytes(data)).decode()


@pytest.mark.parametrize("image", [png_base64((5000, 4000)), png_claiming(20_000, 20_000)])
def test_an_image_over_the_pixel_limit_is_413_whatever_its_form(service, image):
    response = post(service, "/v1/generate", {"prompt": "a cone", "image": image})
    assert (response.status_code, response.json()["field"]) == (413, "image")


def test_a_data_url_image_is_accepted(service):
    image = "data:image/png;base64," + png_base64()
    response = post(service, "/v1/generate", {"prompt": "a cube like this", "image": image, "seed": 1})
    assert response.status_code == 200, response.text


def test_an_unknown_route_answers_in_the_api_error_shape_and_is_counted(service):
    before = metric(service, "gap3d_requests_total", route="unmatched", status="404")
    response = httpx.get(f"{service}/v2/nothing-here", headers=AUTH, timeout=10)
    assert response.status_code == 404 and set(response.json()) == {"error"}
    assert metric(service, "gap3d_requests_total", route="unmatched", status="404") == before + 1


def test_an_unknown_job_id_is_not_echoed(service):
    response = httpx.get(f"{service}/v1/jobs/{'x' * 10_000}", headers=AUTH, timeout=10)
    assert response.status_code == 404 and len(response.text) < 200


def test_oversized_body_is_rejected_before_parsing(service):
    response = httpx.post(
        f"{service}/v1/generate",
        content=b"{" + b" " * (33 * 1024 * 1024) + b"}",
        headers={**AUTH, "content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 413


def test_requests_without_a_valid_key_get_401_but_the_probes_stay_open(service):
    assert post(service, "/v1/generate", {"prompt": "a cone"}, headers={}).status_code == 401
    assert (
        post(service, "/v1/generate", {"prompt": "a cone"}, headers={"Authorization": "Bearer wrong"}).status_code
        == 401
    )
    assert httpx.get(f"{service}/healthz", timeout=10).json() == {"status": "alive"}
    assert httpx.get(f"{service}/readyz", timeout=10).json()["status"] == "ready"


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_the_docs_need_a_key_like_every_route_but_the_probes(service, path):
    assert httpx.get(f"{service}{path}", timeout=10).status_code == 401
    assert httpx.get(f"{service}{path}", headers=AUTH, timeout=10).status_code == 200


def test_readyz_reports_a_running_replica_for_every_deployment(service):
    deployments = httpx.get(f"{service}/readyz", timeout=10).json()["deployments"]
    assert set(deployments) == DEPLOYMENTS
    assert all(view["running_replicas"] >= 1 for view in deployments.values())


def test_models_lists_each_stage_and_where_it_was_loaded_from(service, serve_artifacts):
    models = httpx.get(f"{service}/v1/models", headers=AUTH, timeout=30).json()
    assert models["stages"]["decoder"]["trellis"] == serve_artifacts["trellis"]
    assert models["stages"]["aligner"]["export"] == serve_artifacts["export"]
    assert models["config"]["preset"] == "tiny"


def test_metrics_are_scrapeable_in_prometheus_format(service):
    post(service, "/v1/embed", {"prompt": "a cone", "steps": 2})
    text = httpx.get(f"{service}/metrics", headers=AUTH, timeout=30).text
    assert 'gap3d_requests_total{route="/v1/embed",status="200"}' in text
    assert (
        'gap3d_stage_seconds_bucket{le="0.01",outcome="ok",stage="aligner"}' in text
        and "gap3d_aligner_batch_size_count" in text
    )
    for family in (
        "gap3d_stage_errors",
        "gap3d_stage_requests_waiting",
        "gap3d_requests_cancelled",
        "gap3d_jobs",
        "gap3d_generations_admitted",
    ):
        assert f"# TYPE {family}" in text


def test_openapi_documents_the_versioned_routes(service):
    paths = httpx.get(f"{service}/openapi.json", headers=AUTH, timeout=30).json()["paths"]
    assert {
        "/v1/generate",
        "/v1/embed",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/result",
        "/v1/models",
        "/healthz",
        "/readyz",
        "/generate",
        "/send",
        "/status/{uid}",
    } <= set(paths)


@pytest.mark.parametrize("path", ["serve/config.yaml", "serve/config.gpu.yaml"])
def test_shipped_serve_configs_validate_and_name_every_deployment_of_the_app(path):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema(**yaml.safe_load(open(path)))
    application = schema.applications[0]
    assert application.import_path == "serve.app:app"
    assert {d.name for d in application.deployments} == DEPLOYMENTS


@pytest.mark.parametrize("path", ["serve/config.yaml", "serve/config.gpu.yaml"])
def test_shipped_configs_admit_by_the_decoders_concurrency_and_scale_jobs_on_their_own_queue(path):
    application = yaml.safe_load(open(path))["applications"][0]
    deployments = {d["name"]: d for d in application["deployments"]}
    limits = application["args"]["limits"]
    assert limits["decoder_slots_per_replica"] == deployments["DecoderDeployment"]["max_ongoing_requests"]
    policy = deployments["JobRunnerDeployment"]["autoscaling_config"]["policy"]["policy_kwargs"]
    assert (policy["broker_url"], policy["queue_name"]) == (
        application["args"]["jobs"]["broker"],
        application["args"]["jobs"]["queue"],
    )


@pytest.mark.parametrize("path", ["serve/config.yaml", "serve/config.gpu.yaml"])
def test_shipped_configs_leave_the_gateway_room_beyond_its_own_in_flight_cap(path):
    application = yaml.safe_load(open(path))["applications"][0]
    gateway = next(d for d in application["deployments"] if d["name"] == "GatewayDeployment")
    assert application["args"]["limits"]["max_requests_in_flight"] < gateway["max_ongoing_requests"]


def test_every_rayservice_pod_starts_serves_proxy_with_the_body_cut_off():
    from serve.proxy_guard import CALLBACK, CALLBACK_ENV

    spec = yaml.safe_load(open("cluster/kuberay/rayservice.yaml"))["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            assert {"name": CALLBACK_ENV, "value": CALLBACK} in container["env"], container["name"]
