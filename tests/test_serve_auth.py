"""Bearer-token checks of the gateway (in-process, no cluster): every malformed credential is refused, never a crash;
the probes alone declare no key; keys come only from the sources the Serve config names."""

import asyncio

import pytest
from fastapi.routing import APIRoute
from starlette.requests import Request

from serve.api import ApiError
from serve.auth import bearer, caller, identify, load_api_keys
from serve.routes import docs, hunyuan_api, native, probes

KEYS = frozenset({"test-key-123"})


def identify_header(authorization: bytes | None, keys: frozenset[str] = KEYS):
    headers = [] if authorization is None else [(b"authorization", authorization)]
    request = Request({"type": "http", "method": "POST", "path": "/v1/generate", "headers": headers})
    return identify(asyncio.run(bearer(request)), keys)


def test_the_configured_bearer_token_is_accepted():
    assert identify_header(b"Bearer test-key-123").owner


def test_callers_with_different_keys_are_different_owners():
    keys = frozenset({"key-a", "key-b"})
    assert identify_header(b"Bearer key-a", keys) != identify_header(b"Bearer key-b", keys)


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        b"",
        b"Bearer",
        b"Bearer ",
        b"Bearer wrong-key",
        b"Basic test-key-123",
        b"test-key-123",
        "Bearer cl\u00e9".encode("latin-1"),
        "Bearer \u043a\u043b\u044e\u0447".encode("utf-8"),
        b"Bearer test-key-123\xff",
    ],
)
def test_a_missing_wrong_or_malformed_credential_is_refused(authorization):
    with pytest.raises(ApiError) as refused:
        identify_header(authorization)
    assert refused.value.status == 401 and refused.value.headers["WWW-Authenticate"] == "Bearer"


def declares_a_key(route: APIRoute) -> bool:
    return any(dependency.call is caller for dependency in route.dependant.dependencies)


@pytest.mark.parametrize("route", probes.routes, ids=lambda route: route.path)
def test_the_probes_need_no_key(route):
    assert not declares_a_key(route)


@pytest.mark.parametrize(
    "route", [*native.routes, *hunyuan_api.routes, *docs.routes], ids=lambda route: f"{route.methods} {route.path}"
)
def test_every_other_route_needs_a_key(route):
    assert declares_a_key(route)


def test_with_no_keys_configured_every_caller_is_one_anonymous_owner():
    assert identify_header(None, frozenset()).owner == identify_header(b"Bearer anything", frozenset()).owner == ""


def test_keys_are_read_from_the_configured_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("key-a\n\n  key-b  \n")
    assert load_api_keys(str(path), None) == {"key-a", "key-b"}


def test_keys_are_read_from_the_configured_variable(monkeypatch):
    monkeypatch.setenv("SERVICE_KEYS", "key-a, key-b,")
    assert load_api_keys(None, "SERVICE_KEYS") == {"key-a", "key-b"}


def test_with_no_source_configured_auth_is_off_whatever_the_environment_holds(monkeypatch):
    monkeypatch.setenv("GAP3D_API_KEYS", "key-from-a-shell")
    assert load_api_keys(None, None) == frozenset()


def test_a_configured_file_that_is_missing_fails_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing-keys"):
        load_api_keys(str(tmp_path / "missing-keys"), None)


def test_a_configured_variable_that_is_unset_fails_naming_it(monkeypatch):
    monkeypatch.delenv("SERVICE_KEYS", raising=False)
    with pytest.raises(KeyError, match="SERVICE_KEYS"):
        load_api_keys(None, "SERVICE_KEYS")


def test_a_configured_source_without_keys_fails(tmp_path):
    (tmp_path / "keys").write_text("\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_api_keys(str(tmp_path / "keys"), None)
