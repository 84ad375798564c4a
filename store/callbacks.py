"""Callback (webhook) targets: which URLs the service may POST a job record to.

A ``callback_url`` is a request the service makes on a client's behalf, so it
must not reach what only the service can reach: loopback, private, link-local
(the cloud metadata address 169.254.169.254), multicast, unspecified and other
non-global addresses are refused, whatever spelling the URL uses (``127.1``,
``2130706433``, ``[::ffff:127.0.0.1]``), because the check applies to the
addresses the host name *resolves to*. The API checks at submission; the
worker checks again at delivery and connects to the address it checked (a DNS
answer that changes in between cannot redirect the POST). Networks listed in
``ALSUB_CALLBACK_ALLOWED_NETWORKS`` are allowed explicitly (internal hooks).
Used by both the API and the worker, so it imports neither.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["CallbackRefusedError", "CallbackTarget", "resolve_callback"]

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class CallbackRefusedError(ValueError):
    """A callback URL that is malformed or points where the service must not send requests."""


@dataclass(frozen=True)
class CallbackTarget:
    """A checked callback: the URL, its host name, port and the address to connect to."""

    url: str
    scheme: str
    host: str
    port: int
    address: str

    def pinned_url(self) -> str:
        """The URL with its host replaced by the checked address (send ``Host``/SNI = host)."""
        parts = urlsplit(self.url)
        address = f"[{self.address}]" if ":" in self.address else self.address
        path = parts.path or "/"
        query = f"?{parts.query}" if parts.query else ""
        return f"{self.scheme}://{address}:{self.port}{path}{query}"


def _parse(url: str) -> tuple[str, str, int]:
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError as exc:  # "http://[::1", "http://h:99999"
        raise CallbackRefusedError(f"callback_url is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise CallbackRefusedError("callback_url must be an http:// or https:// URL")
    if not host:
        raise CallbackRefusedError("callback_url has no host")
    if parts.username is not None or parts.password is not None:
        raise CallbackRefusedError("callback_url must not carry credentials")
    return scheme, host, port or (443 if scheme == "https" else 80)


def _forbidden(address: _Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        not address.is_global
        or address.is_multicast
        or address.is_loopback
        or address.is_link_local
        or address.is_unspecified
        or address.is_reserved
    )


def _networks(allowed: list[str]) -> list[_Network]:
    return [ipaddress.ip_network(text, strict=False) for text in allowed]


def resolve_callback(url: str, allowed_networks: list[str] | None = None) -> CallbackTarget:
    """Check a callback URL and pick the address to deliver to.

    Parameters
    ----------
    url : `str`
        The ``callback_url`` of a job.
    allowed_networks : `list` of `str` or None
        CIDR networks allowed even though they are not global (internal hooks).

    Returns
    -------
    target : `CallbackTarget`

    Raises
    ------
    CallbackRefusedError
        Malformed URL, a host that does not resolve, or any resolved address
        that is not global and not in ``allowed_networks``.
    """
    scheme, host, port = _parse(url)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise CallbackRefusedError(f"callback_url host {host!r} does not resolve") from None
    addresses = []
    for info in infos:
        text = str(info[4][0]).split("%")[0]  # drop an IPv6 zone index
        addresses.append(ipaddress.ip_address(text))
    if not addresses:
        raise CallbackRefusedError(f"callback_url host {host!r} does not resolve")
    networks = _networks(allowed_networks or [])
    for address in addresses:
        if _forbidden(address) and not any(address in network for network in networks):
            raise CallbackRefusedError(
                f"callback_url host {host!r} resolves to a loopback, private, link-local, "
                "multicast or reserved address; give a public URL (operators can allow "
                "internal networks with ALSUB_CALLBACK_ALLOWED_NETWORKS)"
            )
    return CallbackTarget(url=url, scheme=scheme, host=host, port=port, address=str(addresses[0]))
