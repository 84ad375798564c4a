"""Tests of store.callbacks: callback URLs that reach internal addresses are refused."""

from __future__ import annotations

import pytest

from store.callbacks import CallbackRefusedError, resolve_callback

#: Every spelling issue 12 saw delivered, and their neighbours.
FORBIDDEN = [
    "http://127.0.0.1/hook",
    "http://localhost:8000/hook",
    "http://0.0.0.0/",
    "http://2130706433/",
    "http://127.1/",
    "http://0x7f.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::]/",
    "http://10.1.2.3/",
    "http://192.168.0.1/",
    "http://172.16.5.4/",
    "http://100.64.0.1/",
    "http://224.0.0.1/",
    "http://[fe80::1]/",
    "http://[ff02::1]/",
]
MALFORMED = [
    "http://[::1",
    "http://host:99999/",
    "ftp://example.org/",
    "http:///path",
    "http://u:p@1.1.1.1/",
]


@pytest.mark.parametrize("url", FORBIDDEN)
def test_internal_targets_are_refused_after_resolution(url):
    with pytest.raises(CallbackRefusedError, match="loopback, private"):
        resolve_callback(url)


@pytest.mark.parametrize("url", MALFORMED)
def test_malformed_urls_are_refused(url):
    with pytest.raises(CallbackRefusedError):
        resolve_callback(url)


def test_allowed_networks_open_internal_hooks_only():
    target = resolve_callback("http://127.0.0.2:8080/a?b=1", ["127.0.0.2/32"])
    assert (target.host, target.port, target.address) == ("127.0.0.2", 8080, "127.0.0.2")
    assert target.pinned_url() == "http://127.0.0.2:8080/a?b=1"
    with pytest.raises(CallbackRefusedError):
        resolve_callback("http://127.0.0.1:8080/", ["127.0.0.2/32"])


def test_public_literal_is_pinned_to_the_checked_address():
    target = resolve_callback("https://8.8.8.8/done")
    assert target.address == "8.8.8.8" and target.port == 443
    assert target.pinned_url() == "https://8.8.8.8:443/done"
