"""Bearer-token checks of the gateway (in-process, no cluster): every malformed credential is refused, never a crash;
keys come only from the sources the Serve config names."""

import pytest
from starlette.requests import Request

from serve.api import authorized, load_api_keys

KEYS = frozenset({"test-key-123"})


def request(path: str, authorization: bytes | None) -> Request:
    headers = [] if authorization is None else [(b"authorization", authorization)]
    return Request({"type": "http", "method": "POST", "path": path, "headers": headers})


def test_the_configured_bearer_token_is_accepted():
    assert authorized(request("/v1/generate", b"Bearer test-key-123"), KEYS)


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
    assert not authorized(request("/v1/generate", authorization), KEYS)


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_the_probes_need_no_key(path):
    assert authorized(request(path, None), KEYS)


@pytest.mark.parametrize(
    "path", ["/docs", "/openapi.json", "/redoc", "/metrics", "/generate", "/send", "/status/abc", "/v1/jobs"]
)
def test_every_other_route_needs_a_key(path):
    assert not authorized(request(path, None), KEYS)


def test_with_no_keys_configured_every_route_is_open():
    assert authorized(request("/v1/generate", None), frozenset())


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
