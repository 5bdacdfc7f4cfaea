"""The Gateway's app in-process (no cluster, no stage called): middleware, error shapes and accounting.

The app is serve/routes.py's, around a Gateway whose stage handles are never reached by these requests; the uploads
come through httpx's ASGI transport, which hands the body to the app as a real server would.
"""

import asyncio

import httpx
import pytest
from ray.exceptions import TaskCancelledError

from serve.api import ApiError, ServeLimits
from serve.middleware import BodyReader
from serve.proxy_guard import BodyCutoff
from serve.readiness import AppView
from serve.routes import build_api
from serve.service import Gateway
from serve.stage_calls import StageHandles

CONFIG = {"flow": {"sample_steps": 4, "cfg_scale": 2.0}, "vlm": {"max_prompt_tokens": 256}}


def app(keys=frozenset({"key"}), **limits):
    gateway = Gateway(StageHandles(None, None, None), ServeLimits(**limits), CONFIG, None, AppView("gap3d"))
    return build_api(gateway, keys), gateway


def call(api, method: str, path: str, **kwargs) -> httpx.Response:
    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://gap3d") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(run())


def requests_counted(gateway: Gateway, route: str, status: int) -> float:
    labels = {"route": route, "status": str(status)}
    return gateway.metrics.registry.get_sample_value("gap3d_requests_total", labels) or 0


def test_an_unknown_route_is_a_json_404_counted_as_unmatched():
    api, gateway = app()
    response = call(api, "GET", "/nothing/here")
    assert (response.status_code, set(response.json())) == (404, {"error"})
    assert requests_counted(gateway, "unmatched", 404) == 1


def test_a_wrong_method_is_a_json_405():
    response = call(app()[0], "PUT", "/healthz")
    assert response.status_code == 405 and "error" in response.json()


def test_a_missing_key_is_a_json_401_counted_on_its_route():
    api, gateway = app()
    response = call(api, "POST", "/v1/generate", json={"prompt": "a cone"})
    assert (response.status_code, response.json(), response.headers["www-authenticate"]) == (
        401,
        {"error": "missing or invalid API key"},
        "Bearer",
    )
    assert requests_counted(gateway, "/v1/generate", 401) == 1


def test_a_body_that_is_not_json_is_a_422_on_the_body():
    response = call(app(frozenset())[0], "POST", "/v1/generate", content=b"{not json", headers={"content-type": "x"})
    assert (response.status_code, response.json()["field"]) == (422, "body")


def test_a_declared_body_over_the_limit_is_413_before_it_is_read():
    response = call(app(frozenset(), max_body_bytes=1000)[0], "POST", "/v1/generate", content=b"{" + b" " * 2000 + b"}")
    assert response.status_code == 413 and response.headers["connection"] == "close"


def test_errors_on_hunyuans_routes_keep_hunyuans_body():
    response = call(app(frozenset())[0], "POST", "/generate", json={"text": "a", "type": "fbx"})
    assert response.status_code == 422 and response.json() == {
        "text": "Input should be 'glb', 'obj' or 'ply'",
        "error_code": 1,
    }


def test_jobs_on_a_service_without_them_are_503():
    response = call(app(frozenset())[0], "DELETE", "/v1/jobs/" + "0" * 32)
    assert response.status_code == 503 and "not configured" in response.json()["error"]


def test_requests_beyond_the_in_flight_cap_get_503_at_once_but_the_probes_pass():
    api, gateway = app(frozenset(), max_requests_in_flight=2)
    release = asyncio.Event()

    async def held_stall():  # two uploads whose bodies never come
        async def receive():
            await release.wait()
            return {"type": "http.disconnect"}

        scope = {"type": "http", "method": "POST", "path": "/v1/generate", "headers": [(b"content-length", b"9")]}
        scope |= {
            "query_string": b"",
            "root_path": "",
            "scheme": "http",
            "server": ("gap3d", 80),
            "http_version": "1.1",
        }
        await api(scope, receive, lambda message: asyncio.sleep(0))

    async def run():
        held = [asyncio.ensure_future(held_stall()) for _ in range(2)]
        await asyncio.sleep(0.1)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://gap3d") as client:
            refused = await client.post("/v1/generate", json={"prompt": "a cone"})
            probe = await client.get("/healthz")
        release.set()
        await asyncio.gather(*held)
        return refused, probe

    refused, probe = asyncio.run(run())
    assert (refused.status_code, refused.headers["retry-after"], probe.status_code) == (503, "2", 200)
    assert requests_counted(gateway, "/v1/generate", 503) == 1 and requests_counted(gateway, "/v1/generate", 499) == 2


def messages(*parts: tuple[float, dict]):
    """A `receive` that returns each message after its delay (seconds)."""
    queue = list(parts)

    async def receive():
        delay, message = queue.pop(0)
        await asyncio.sleep(delay)
        return message

    return receive


def body(data: bytes, more: bool = True) -> dict:
    return {"type": "http.request", "body": data, "more_body": more}


def read_all(reader: BodyReader) -> bytes:
    async def run():
        data = b""
        while True:
            message = await reader()
            data += message["body"]
            if not message["more_body"]:
                return data

    return asyncio.run(run())


LIMITS = ServeLimits(max_body_bytes=100, body_stall_s=0.3, min_body_rate=1000)


def refusal_status(reader: BodyReader) -> int:
    with pytest.raises(ApiError) as refused:
        read_all(reader)
    return refused.value.status


def test_a_body_arriving_in_time_is_read_whole():
    reader = BodyReader(messages((0, body(b"ab")), (0.1, body(b"cd", more=False))), LIMITS, declared=None)
    assert read_all(reader) == b"abcd" and reader.size == 4


def test_a_body_that_stalls_is_a_408():
    assert refusal_status(BodyReader(messages((0, body(b"ab")), (1.0, body(b"cd"))), LIMITS, None)) == 408


def test_a_body_trickling_below_the_minimum_rate_is_a_408():
    trickle = [(0.1, body(b"x")) for _ in range(20)]  # 10 bytes/s, every piece well within the stall limit
    assert refusal_status(BodyReader(messages(*trickle), LIMITS, None)) == 408


def test_a_chunked_body_past_the_limit_is_a_413_as_soon_as_it_passes():
    reader = BodyReader(messages(*[(0, body(b"x" * 60)) for _ in range(5)]), LIMITS, None)
    assert refusal_status(reader) == 413 and reader.size == 120


def test_a_client_gone_mid_body_is_a_499():
    reader = BodyReader(messages((0, body(b"ab")), (0, {"type": "http.disconnect"})), LIMITS, None)
    assert refusal_status(reader) == 499


def test_a_request_cancelled_by_serve_mid_body_is_a_499_not_a_400():
    # Serve cancels the request when its client disconnects; fetching the rest of the body then raises this.
    async def receive():
        raise TaskCancelledError()

    assert refusal_status(BodyReader(receive, LIMITS, None)) == 499


def test_the_proxy_stops_reading_a_body_at_the_first_message_past_its_cut_off():
    arriving = [body(b"x" * 60) for _ in range(5)]
    taken, seen = [], []

    async def receive():
        taken.append(arriving.pop(0))
        return taken[-1]

    async def app(scope, receive, send):  # reads as Serve's proxy does: everything, at once
        while not seen or seen[-1]["more_body"]:
            seen.append(await receive())
        with pytest.raises(TimeoutError):  # and then waits for a disconnect that never comes from this body
            await asyncio.wait_for(receive(), 0.2)

    asyncio.run(BodyCutoff(app, max_body_bytes=100)({"type": "http"}, receive, None))
    assert len(taken) == 2 and [message["more_body"] for message in seen] == [True, False]
