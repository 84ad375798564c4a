"""Shared request dependencies: settings, store, queue, the caller's identity and rate limits.

Everything comes from ``request.app.state`` (set by `app.main.create_app`), so
tests and deployments build independent apps from their own `Settings`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from store import Settings, Store
from store.errors import UNAVAILABLE_ERRORS

from .errors import ApiError
from .queue import JobQueue

__all__ = [
    "get_settings",
    "get_store",
    "get_queue",
    "Caller",
    "get_caller",
    "client_address",
    "operator_access",
]

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


def client_address(request: Request, settings: Settings) -> str:
    """The caller's address: the TCP peer, or, behind a trusted proxy, the forwarded client.

    ``X-Forwarded-For`` is read right to left, skipping trusted proxies; the first
    address that is not one is the client. Without ``trusted_proxies`` the header is
    ignored, so a client cannot pick its own rate-limit bucket.
    """
    peer = request.client.host if request.client else "unknown"
    networks = [ipaddress.ip_network(n) for n in settings.trusted_proxies]
    if not networks or not _in_networks(peer, networks):
        return peer
    hops = [h.strip() for h in ",".join(request.headers.getlist("x-forwarded-for")).split(",")]
    for hop in reversed([h for h in hops if h]):
        if not _in_networks(hop, networks):
            return hop if _is_address(hop) else peer
    return peer


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _in_networks(text: str, networks) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return any(address in network for network in networks)


def _token_matches(supplied: str, settings: Settings) -> bool:
    # Compare against every token in constant time, so timing does not leak a prefix.
    matches = [hmac.compare_digest(supplied.encode(), t.encode()) for t in settings.tokens]
    return bool(supplied) and any(matches)


def _unauthorized() -> ApiError:
    return ApiError(
        401,
        "unauthorized",
        "missing or invalid bearer token (send 'Authorization: Bearer <token>')",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _too_many(message: str) -> ApiError:
    return ApiError(429, "rate_limited", message, headers={"Retry-After": "60"})


def _limit(store: Store, bucket: str, budget: int, what: str) -> None:
    if budget > 0 and store.records.hit(bucket, 60.0) > budget:
        raise _too_many(f"more than {budget} {what} per minute; slow down")


def get_caller(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    settings: Settings = Depends(get_settings),
    store: Store = Depends(get_store),
) -> Caller:
    """Authenticate the bearer token (when tokens are configured) and apply the rate limits.

    Wrong or missing tokens are counted per client address; past
    ``auth_failures_per_minute`` the address gets 429 even with a right token, so
    tokens cannot be guessed at speed. Reads (GET, HEAD) and writes have separate
    per-caller budgets, so polling does not starve submissions nor the reverse.
    """
    address = client_address(request, settings)
    if settings.tokens:
        failures_key = f"authfail:ip-{address}"
        budget = settings.auth_failures_per_minute
        if budget > 0 and store.records.count(failures_key, 60.0) >= budget:
            raise _too_many(
                f"more than {budget} requests with a wrong token from this address in a minute; "
                "wait"
            )
        supplied = credentials.credentials if credentials is not None else ""
        if not _token_matches(supplied, settings):
            if budget > 0:
                store.records.hit(failures_key, 60.0)
            raise _unauthorized()
        caller = Caller(owner=owner_of(supplied))
        limit_key = caller.owner
    else:
        caller = Caller(owner=PUBLIC_OWNER)
        limit_key = f"ip-{address}"
    if request.method in ("GET", "HEAD"):
        _limit(store, f"read:{limit_key}", settings.read_rate_limit_per_minute, "reads")
    else:
        _limit(store, f"rate:{limit_key}", settings.rate_limit_per_minute, "requests")
    return caller


def operator_access(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    settings: Settings = Depends(get_settings),
    store: Store = Depends(get_store),
) -> None:
    """Guard of /readyz and /metrics: a valid token when tokens are set, unless opened."""
    if settings.tokens and not settings.open_health_endpoints:
        try:
            get_caller(request, credentials, settings, store)
        except UNAVAILABLE_ERRORS:
            # The store is down, so the counters are: /readyz must still be able to say so.
            supplied = credentials.credentials if credentials is not None else ""
            if not _token_matches(supplied, settings):
                raise _unauthorized() from None
