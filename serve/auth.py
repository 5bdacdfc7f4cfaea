"""API keys: where they come from, and the security dependency every route but the probes declares.

A kubelet has no key, so /healthz and /readyz declare none; every other route, the docs included, needs
`Authorization: Bearer KEY` once keys are configured.
"""

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from serve.api import ApiError

bearer = HTTPBearer(auto_error=False, description="one of the service's API keys")


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as far as jobs care."""

    owner: str  # digest of the caller's API key ("" with auth off): scopes Idempotency-Keys and job quotas


def load_api_keys(keys_file: str | None, keys_env: str | None) -> frozenset[str]:
    """Bearer tokens from a file (one per line: a mounted secret) and/or the variable `keys_env`; none = auth off.

    Both are named in the Serve config, never taken from whoever runs `serve run`; a named source that is missing
    fails the replica's start, so a typo cannot silently open the service.
    """
    keys: set[str] = set()
    if keys_file:
        path = Path(keys_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"api_keys_file {path} does not exist on this node; mount the secret there or fix the path in the "
                "Serve config"
            )
        keys |= {line.strip() for line in path.read_text().splitlines() if line.strip()}
    if keys_env:
        if keys_env not in os.environ:
            raise KeyError(
                f"api_keys_env names ${keys_env}, which the Gateway's environment lacks; set it in the deployment's "
                "runtime_env env_vars or the pod"
            )
        keys |= {key.strip() for key in os.environ[keys_env].split(",") if key.strip()}
    if (keys_file or keys_env) and not keys:
        raise ValueError(f"the configured API key source ({keys_file or '$' + keys_env}) holds no key")
    return frozenset(keys)


def key_matches(token: str, keys: frozenset[str]) -> bool:
    """Whether `token` is one of `keys`, in constant time per key."""
    # Bytes, not str: compare_digest refuses non-ASCII str, and any malformed credential must be a 401, not a 500.
    offered = token.strip().encode("utf-8", "surrogateescape")
    return any(hmac.compare_digest(offered, key.encode("utf-8")) for key in keys)


def identify(credentials: HTTPAuthorizationCredentials | None, keys: frozenset[str]) -> Caller:
    """The caller behind `credentials`; ApiError 401 when keys are configured and none of them was offered."""
    if not keys:
        return Caller(owner="")
    if credentials is None or not key_matches(credentials.credentials, keys):
        raise ApiError(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"}, kind="unauthorized")
    return Caller(owner=hashlib.sha256(credentials.credentials.strip().encode("utf-8", "surrogateescape")).hexdigest())


def caller(request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> Caller:
    """The security dependency: the keys are the app's (`app.state.api_keys`, set by serve/routes.py)."""
    return identify(credentials, request.app.state.api_keys)
