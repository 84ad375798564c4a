"""app.uris: what a refused file:// URI tells the caller to change."""

from __future__ import annotations

import pytest

from app.errors import ApiError
from app.uris import open_uri
from store import Settings


def test_uris_without_allowed_roots_say_how_to_send_the_file(tmp_path):
    image = tmp_path / "science.fits"
    image.write_bytes(b"SIMPLE")
    with pytest.raises(ApiError) as refused:
        open_uri(f"file://{image}", Settings(data_dir=tmp_path, allowed_roots=[]))
    assert refused.value.status == 422 and refused.value.code == "uri_not_allowed"
    # the setting that enables URIs, and the way that works without it
    assert "ALSUB_ALLOWED_ROOTS" in refused.value.message
    assert "POST /v1/exposures" in refused.value.message
