"""Service settings, read from ``ALSUB_*`` environment variables.

One `Settings` object configures both the API (``app``) and the workers
(``worker``), so the two always agree on the data directory, the broker and
the limits. It lives in the shared ``store`` package because neither side may
import the other's framework.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "settings_markdown", "unknown_variables", "missing_roots"]

#: Levels both the standard logging and uvicorn know (``alsub serve`` passes it to both).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


#: Ceilings of the time settings (seconds): beyond them a value is a slip (an extra digit,
#: "inf"), and some became an OverflowError in a wait or turned a safeguard off for good.
_HOUR, _DAY, _WEEK = 3600.0, 86400.0, 7 * 86400.0


def _split_list(value):
    # Environment variables carry lists as comma- or whitespace-separated text.
    if isinstance(value, str):
        return [item for item in value.replace(",", " ").split() if item]
    return value


class Settings(BaseSettings):
    """Configuration of the alsub service (API and workers).

    Every field reads the environment variable ``ALSUB_<FIELD NAME IN CAPITALS>``;
    lists are comma-separated.
    """

    # a bad setting's error must not print the others' values (tokens, a Redis password)
    # no float setting may be inf or nan: "inf" made /readyz raise OverflowError forever and
    # ALSUB_HEARTBEAT_TIMEOUT=inf turned lost-job recovery off without a word
    model_config = SettingsConfigDict(
        env_prefix="ALSUB_", extra="ignore", hide_input_in_errors=True, allow_inf_nan=False
    )

    data_dir: Path = Field(
        Path("alsub-data"),
        description="Directory of exposures, products, job records (embedded) and local broker.",
    )
    redis_url: str | None = Field(
        None,
        description="Redis URL (e.g. redis://redis:6379/0). Set: Redis is broker and job-record "
        "store (distributed deployment). Unset: local broker and records under data_dir.",
    )
    redis_prefix: str = Field("alsub:", description="Prefix of every Redis key alsub writes.")
    broker_key_prefix: str = Field(
        "",
        description="Prefix of the Celery broker's Redis keys (tools such as Flower must use "
        "the same); empty: Celery's own key names.",
    )
    # empty, the API sent jobs to a queue no worker took (and /readyz said not ready)
    queue_name: str = Field(
        "alsub", min_length=1, description="Celery queue the subtraction jobs go to."
    )
    tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bearer tokens the API accepts (comma-separated). Empty: no authentication.",
    )
    max_upload_bytes: int = Field(
        512 * 1024**2, gt=0, description="Largest accepted upload (bytes); larger answers 413."
    )
    max_pixels: int = Field(
        8192 * 8192, gt=0, description="Largest accepted image (pixels); larger answers 422."
    )
    rate_limit_per_minute: int = Field(
        600,
        ge=0,
        description="Write requests (uploads, submissions, deletes) per minute per token (or "
        "client address without tokens); 0 disables.",
    )
    read_rate_limit_per_minute: int = Field(
        6000,
        ge=0,
        description="Read requests (GET: job status, listings, products) per minute per token "
        "(or client address), so dashboards can poll; 0 disables.",
    )
    auth_failures_per_minute: int = Field(
        30,
        ge=0,
        description="Requests with a missing or wrong token per minute per client address; past "
        "it every request of that address answers 429 for the rest of the minute. 0 disables.",
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="CIDR networks of reverse proxies whose X-Forwarded-For names the client "
        "(comma-separated). Empty: the header is ignored and the peer address is the client.",
    )
    max_concurrent_jobs: int = Field(
        8, ge=1, description="Queued plus running jobs per token; more answers 429."
    )
    open_health_endpoints: bool = Field(
        False,
        description="Serve /readyz and /metrics without a token although tokens are set (they "
        "show worker host names and every tenant's job counts). /healthz is always open.",
    )
    allowed_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Directories that file:// URIs may point into (comma-separated). "
        "Empty: URIs are refused.",
    )
    soft_time_limit: float = Field(
        540.0,
        gt=0,
        le=_WEEK,
        description="Seconds after which a job stops and fails as time_limit_exceeded.",
    )
    hard_time_limit: float = Field(
        600.0,
        gt=0,
        le=_WEEK,
        description="Seconds after which the worker process running a job is killed.",
    )
    visibility_timeout: float | None = Field(
        None,
        gt=0,
        le=2 * _WEEK,
        description="Seconds before Redis redelivers an unacked job; default hard limit + 300.",
    )
    heartbeat_interval: float = Field(
        5.0,
        gt=0,
        le=_HOUR,
        description="Seconds between heartbeats a running job writes to its record.",
    )
    heartbeat_timeout: float = Field(
        60.0,
        gt=0,
        le=_DAY,
        description="A running job whose heartbeat is older than this is requeued (its worker is "
        "considered lost).",
    )
    queued_resend_after: float = Field(
        300.0,
        gt=0,
        le=_WEEK,
        description="Seconds a job may wait queued before its message is sent again (the broker "
        "can lose one taken by a worker killed or cut off mid-fetch); a duplicate is skipped.",
    )
    max_attempts: int = Field(
        3, ge=1, description="Deliveries of one job before it fails as worker_lost."
    )
    worker_concurrency: int = Field(
        1, ge=1, description="Jobs one worker process runs in parallel (Celery prefork children)."
    )
    worker_threads: int = Field(
        0,
        ge=0,
        description="Threads one job may use. 0: this machine's cores shared out among the jobs "
        "that can run on it at once (live workers on this host x worker_concurrency), so workers "
        "side by side do not oversubscribe the cores.",
    )
    callback_allowed_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="CIDR networks callback_url may reach although they are not public "
        "(comma-separated, e.g. 10.0.0.0/8 for internal hooks). Empty: only global addresses.",
    )
    # the backoff doubles each retry: 30 doublings of 2 s wait 68 years already
    webhook_retries: int = Field(
        5, ge=0, le=30, description="Retries of a failed callback_url POST."
    )
    webhook_backoff: float = Field(
        2.0,
        ge=0,
        le=_HOUR,
        description="Seconds before the first callback retry; doubles each retry.",
    )
    webhook_timeout: float = Field(
        10.0, gt=0, le=_HOUR, description="Timeout of one callback POST (s)."
    )
    max_cutout_size: int = Field(1024, ge=8, description="Largest cutout side (pixels).")
    max_list_limit: int = Field(200, ge=1, description="Largest page of a job listing.")
    readiness_timeout: float = Field(
        1.5, gt=0, le=60.0, description="Seconds /readyz waits for a worker to answer a ping."
    )
    tmp_max_age: float = Field(
        3600.0,
        gt=0,
        le=30 * _DAY,
        description="Seconds after which abandoned upload temp files, product staging folders "
        "and product folders of jobs without a record are deleted.",
    )
    min_free_bytes: int = Field(
        256 * 1024**2,
        ge=0,
        description="Free bytes on the data directory's disk below which /readyz says not "
        "ready (uploads and products would soon fail with 507); 0 disables.",
    )
    maintenance_interval: float = Field(
        300.0, gt=0, le=_DAY, description="Seconds between a worker's disk clean-up passes."
    )
    retention_days: float = Field(
        0.0,
        ge=0,
        le=36500.0,  # a century: a larger number is a slip, as for the time settings
        description="Days finished jobs (records and products) and exposures and catalogs no "
        "job uses are kept; the workers' disk clean-up removes older ones. 0: kept forever.",
    )
    log_level: str = Field("INFO", description="Log level of the API and workers.")
    test_stage_delay: float = Field(
        0.0,
        ge=0,
        le=_HOUR,
        description="Debug only, off by default: seconds a worker sleeps at every progress report, "
        "so tests can interrupt or cancel a job mid-run.",
    )
    test_stage_holds_gil: bool = Field(
        False,
        description="Debug only, off by default: the stage delay keeps the GIL (as a long library "
        "call does), so tests can check that heartbeats do not depend on the job's threads.",
    )

    @field_validator(
        "tokens", "allowed_roots", "callback_allowed_networks", "trusted_proxies", mode="before"
    )
    @classmethod
    def _lists_from_text(cls, value):
        return _split_list(value)

    @field_validator("tokens", mode="before")
    @classmethod
    def _some_token_if_set(cls, value):
        # "," or " " is a mistake, not a wish to run open (only an empty value says that)
        if isinstance(value, str) and value.strip() and not _split_list(value):
            raise ValueError(
                "ALSUB_TOKENS is set but holds no token (only separators): give tokens, or "
                "leave it empty to serve without authentication"
            )
        return value

    @field_validator("allowed_roots")
    @classmethod
    def _absolute_roots(cls, roots: list[Path]) -> list[Path]:
        return [Path(os.path.realpath(root)) for root in roots]

    @field_validator("callback_allowed_networks", "trusted_proxies")
    @classmethod
    def _cidr_networks(cls, networks: list[str], info: ValidationInfo) -> list[str]:
        parsed = []
        for number, text in enumerate(networks, 1):
            try:
                parsed.append(str(ipaddress.ip_network(text, strict=False)))
            except ValueError:
                # ipaddress's message quoted the entry: errors show no values
                raise ValueError(
                    f"ALSUB_{info.field_name.upper()}: entry {number} is not a CIDR network "
                    "(e.g. 10.0.0.0/8 or 192.168.1.5)"
                ) from None
        return parsed

    @field_validator("redis_url")
    @classmethod
    def _redis_url_parses(cls, url: str | None) -> str | None:
        # checked here, not by the first connection: a bad URL was a traceback at start-up.
        # The message never quotes the URL (it may hold a password).
        if url:
            from redis.connection import parse_url

            try:
                parse_url(url)
            except ValueError as exc:
                raise ValueError(f"ALSUB_REDIS_URL is not a Redis URL: {exc}") from None
            database = urlsplit(url).path.strip("/")
            if not url.startswith("unix:") and database and not database.isdigit():
                # redis-py took /abc for database 0, the broker refused it
                raise ValueError("ALSUB_REDIS_URL: the path must be a database number (/0)")
        return url

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, level: str) -> str:
        name = level.strip().upper()
        if name not in LOG_LEVELS:
            raise ValueError(f"ALSUB_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")
        return name

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, path: Path) -> Path:
        return Path(os.path.abspath(path))

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if self.soft_time_limit >= self.hard_time_limit:
            raise ValueError(
                f"ALSUB_SOFT_TIME_LIMIT ({self.soft_time_limit:g} s) must be below "
                f"ALSUB_HARD_TIME_LIMIT ({self.hard_time_limit:g} s): set both"
            )
        if self.visibility_timeout is not None and self.visibility_timeout <= self.hard_time_limit:
            raise ValueError(
                f"ALSUB_VISIBILITY_TIMEOUT ({self.visibility_timeout:g} s) must exceed "
                f"ALSUB_HARD_TIME_LIMIT ({self.hard_time_limit:g} s)"
            )
        if self.heartbeat_timeout < 2 * self.heartbeat_interval:
            # a heartbeat older than the timeout requeues the job: with fewer than two beats
            # per timeout, every stage longer than it was requeued mid-run (worker_lost)
            raise ValueError(
                f"ALSUB_HEARTBEAT_TIMEOUT ({self.heartbeat_timeout:g} s) must be at least twice "
                f"ALSUB_HEARTBEAT_INTERVAL ({self.heartbeat_interval:g} s), or running jobs are "
                "requeued as lost between two heartbeats"
            )
        return self

    @property
    def broker_visibility_timeout(self) -> float:
        """Seconds before an unacknowledged message is redelivered (above the hard limit)."""
        if self.visibility_timeout is not None:
            return self.visibility_timeout
        return self.hard_time_limit + 300.0

    @property
    def distributed(self) -> bool:
        """True when Redis carries the queue and the job records."""
        return bool(self.redis_url)


#: ALSUB_* variables read elsewhere: docker/entrypoint.sh and docker-compose.yml, and the one
#: `alsub serve` gives its embedded worker.
_NOT_SETTINGS = frozenset(
    {"ALSUB_PORT", "ALSUB_WORKER_REPLICAS", "ALSUB_STOP_GRACE_PERIOD", "ALSUB_EMBEDDED_PARENT"}
)


def unknown_variables(environ: dict[str, str]) -> list[str]:
    """A warning for each ``ALSUB_*`` variable of ``environ`` that is no setting (a
    misspelling such as ``ALSUB_TOKEN`` was silently ignored), naming the closest known
    one; never the value (it may be a token)."""
    known = {f"ALSUB_{name.upper()}" for name in Settings.model_fields} | _NOT_SETTINGS
    # compared without the prefix, which every name shares (ALSUB_ZZZ was "like" ALSUB_PORT)
    suffixes = sorted(name.removeprefix("ALSUB_") for name in known)
    warnings = []
    for name in sorted(environ):
        upper = name.upper()  # pydantic-settings reads the names in any case
        if not upper.startswith("ALSUB_") or upper in known:
            continue
        close = difflib.get_close_matches(upper.removeprefix("ALSUB_"), suffixes, n=1)
        hint = f"; did you mean ALSUB_{close[0]}?" if close else ""
        warnings.append(f"{name} is not an alsub setting and is ignored{hint}")
    return warnings


def missing_roots(settings: Settings) -> list[str]:
    """A warning for each ``ALSUB_ALLOWED_ROOTS`` directory that does not exist (yet): the
    API opens each root per request, so one mounted later serves from then on."""
    return [
        f"ALSUB_ALLOWED_ROOTS: {root} is not a directory: file:// URIs under it are refused "
        "until it is"
        for root in settings.allowed_roots
        if not root.is_dir()
    ]


def settings_markdown() -> str:
    """A Markdown table of every ``ALSUB_*`` variable, its default and meaning (for the README)."""
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(str(v) for v in default) or "(empty)"
        rows.append(f"| `ALSUB_{name.upper()}` | `{default}` | {field.description} |")
    return "\n".join(rows)
