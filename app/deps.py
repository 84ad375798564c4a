"""Shared request dependencies: settings, store, queue, the caller's identity and rate limits.

Everything comes from ``request.app.state`` (set by `app.main.create_app`), so
tests and deployments build independent apps from their own `Settings`.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from store import Settings, Store

from .errors import ApiError
from .queue import JobQueue

__all__ = ["get_settings", "get_store", "get_queue", "Caller", "get_caller"]

_bearer = HTTPBearer(
    auto_error=False,
    description="A token from ALSUB_TOKENS. Each token sees only its own exposures and jobs.",
)

#: Owner of everything when no tokens are configured.
PUBLIC_OWNER = "public"


def get_settings(request: Request) -> Settings:
    """The app's settings."""
    return request.app.state.settings


def get_store(request: Request) -> Store:
    """The app's store (blobs, products, records)."""
    return request.app.state.store


def get_queue(request: Request) -> JobQueue:
    """The app's queue client."""
    return request.app.state.queue


@dataclass(frozen=True)
class Caller:
    """Who is calling: ``owner`` scopes every exposure and job they can see."""

    owner: str


def owner_of(token: str) -> str:
    """Stable owner id of a token (records never hold the token itself)."""
    return "tok-" + hashlib.sha256(token.encode()).hexdigest()[:24]


def get_caller(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    settings: Settings = Depends(get_settings),
    store: Store = Depends(get_store),
) -> Caller:
    """Authenticate the bearer token (when tokens are configured) and apply the rate limit."""
    if settings.tokens:
        supplied = credentials.credentials if credentials is not None else ""
        # Compare against every token in constant time, so timing does not leak a prefix.
        matches = [hmac.compare_digest(supplied.encode(), t.encode()) for t in settings.tokens]
        if not supplied or not any(matches):
            raise ApiError(
                401,
                "unauthorized",
                "missing or invalid bearer token (send 'Authorization: Bearer <token>')",
                headers={"WWW-Authenticate": "Bearer"},
            )
        caller = Caller(owner=owner_of(supplied))
        limit_key = caller.owner
    else:
        caller = Caller(owner=PUBLIC_OWNER)
        limit_key = f"ip-{request.client.host if request.client else 'unknown'}"
    if settings.rate_limit_per_minute > 0:
        count = store.records.hit(f"rate:{limit_key}", 60.0)
        if count > settings.rate_limit_per_minute:
            raise ApiError(
                429,
                "rate_limited",
                f"more than {settings.rate_limit_per_minute} requests per minute; slow down",
                headers={"Retry-After": "60"},
            )
    return caller
