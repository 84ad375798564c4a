"""The container entry point: no API without authentication by accident.

Runs docker/entrypoint.sh with a stand-in ``alsub`` on PATH that prints what it
was asked to run, so the token logic is checked without a container engine.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _entrypoint(tmp_path: Path, role: str, **env: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "alsub"
    fake.write_text('#!/bin/sh\necho "ran: $* tokens=${ALSUB_TOKENS:-}"\n')
    fake.chmod(0o755)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ALSUB_")}
    environment["PATH"] = f"{bin_dir}{os.pathsep}{environment['PATH']}"
    environment.update(env)
    return subprocess.run(
        ["sh", str(REPO / "docker" / "entrypoint.sh"), role],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_api_without_tokens_generates_a_private_random_one_and_keeps_it(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    first = _entrypoint(tmp_path, "api", ALSUB_DATA_DIR=str(data))
    token = (data / "api-token").read_text().strip()
    assert len(token) >= 32
    assert stat.S_IMODE((data / "api-token").stat().st_mode) == 0o600
    assert f"tokens={token}" in first.stdout and "--workers 0" in first.stdout
    assert token not in first.stderr  # the log names the file, not the secret
    second = _entrypoint(tmp_path, "serve", ALSUB_DATA_DIR=str(data))
    assert f"tokens={token}" in second.stdout  # a restart keeps the token
    other = tmp_path / "other"
    other.mkdir()
    third = _entrypoint(tmp_path, "api", ALSUB_DATA_DIR=str(other))
    assert f"tokens={token}" not in third.stdout  # random, not a fixed default


def test_given_tokens_are_used_as_they_are(tmp_path):
    result = _entrypoint(tmp_path, "api", ALSUB_DATA_DIR=str(tmp_path), ALSUB_TOKENS="a,b")
    assert "tokens=a,b" in result.stdout
    assert not (tmp_path / "api-token").exists()


def test_compose_file_has_no_default_token_and_checks_worker_health():
    compose = (REPO / "docker-compose.yml").read_text()
    assert "ALSUB_TOKENS: ${ALSUB_TOKENS:-}" in compose
    worker = compose.split("\n  worker:\n", 1)[1].split("\n  redis:\n", 1)[0]
    assert '"worker.health"' in worker and "healthcheck:" in worker
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "HEALTHCHECK" in dockerfile and "alsub-healthcheck" in dockerfile


def test_compose_lets_jobs_finish_and_keeps_flower_private():
    """A worker's stop grace covers the hard time limit (60 s killed longer jobs on a warm
    shutdown), and Flower, which asks for no password, is on the host's loopback only."""
    import re

    from store import Settings

    compose = (REPO / "docker-compose.yml").read_text()
    worker = compose.split("\n  worker:\n", 1)[1].split("\n  redis:\n", 1)[0]
    # the default of the variable an operator raises with ALSUB_HARD_TIME_LIMIT
    grace = re.search(r"stop_grace_period: \$\{ALSUB_STOP_GRACE_PERIOD:-(\d+)(m|s)\}", worker)
    assert grace is not None
    seconds = int(grace.group(1)) * (60 if grace.group(2) == "m" else 1)
    assert seconds > Settings().hard_time_limit
    flower = compose.split("\n  flower:\n", 1)[1].split("\nvolumes:\n", 1)[0]
    ports = re.findall(r'- "([^"]+):5555"', flower)
    assert ports and all(p.startswith("127.0.0.1:") for p in ports)
