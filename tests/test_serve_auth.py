"""Bearer-token checks of the gateway (in-process, no cluster): every malformed credential is refused, never a crash."""

import pytest
from starlette.requests import Request

from serve.api import authorized

KEYS = frozenset({"test-key-123"})


def request(path: str, authorization: bytes | None) -> Request:
    headers = [] if authorization is None else [(b"authorization", authorization)]
    return Request({"type": "http", "method": "POST", "path": path, "headers": headers})


def test_the_configured_bearer_token_is_accepted():
    assert authorized(request("/v1/generate", b"Bearer test-key-123"), KEYS)


@pytest.mark.parametrize(
    "authorization",
    [None, b"", b"Bearer", b"Bearer ", b"Bearer wrong-key", b"Basic test-key-123", b"test-key-123", "Bearer cl\u00e9".encode("latin-1"),
     "Bearer \u043a\u043b\u044e\u0447".encode("utf-8"), b"Bearer test-key-123\xff"],
)
def test_a_missing_wrong_or_malformed_credential_is_refused(authorization):
    assert not authorized(request("/v1/generate", authorization), KEYS)


def test_healthz_needs_no_key():
    assert authorized(request("/healthz", None), KEYS)


def test_with_no_keys_configured_every_route_is_open():
    assert authorized(request("/v1/generate", None), frozenset())
