"""Prometheus metrics: jobs by state, job durations, queue depth, HTTP requests.

Job figures are read from the record store at scrape time, so every API
replica reports the same numbers whichever worker ran the jobs.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

from store import JOB_STATES, Store
from store.records import DURATION_BUCKETS

__all__ = ["ServiceMetrics", "RequestMetricsMiddleware"]


class _JobCollector:
    def __init__(self, store: Store):
        self.store = store

    def collect(self):
        counts = self.store.records.state_counts()
        jobs = GaugeMetricFamily("alsub_jobs", "Jobs by state.", labels=["state"])
        for state in JOB_STATES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        yield GaugeMetricFamily(
            "alsub_queue_depth", "Jobs queued and not yet started.", value=counts.get("queued", 0)
        )
        cumulative, total, count = self.store.records.duration_histogram()
        bounds = [str(b) for b in DURATION_BUCKETS] + ["+Inf"]
        yield HistogramMetricFamily(
            "alsub_job_duration_seconds",
            "Run time of finished jobs (start to succeeded/failed).",
            buckets=list(zip(bounds, cumulative, strict=True)),
            sum_value=total,
        )
        workers = self.store.records.live_workers(max_age=60.0)
        yield GaugeMetricFamily(
            "alsub_workers_alive", "Workers seen in the last minute.", value=len(workers)
        )


class ServiceMetrics:
    """The app's Prometheus registry (one per app, so several apps can live in one process)."""

    def __init__(self, store: Store):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_JobCollector(store))
        self.requests = Counter(
            "alsub_http_requests",
            "HTTP requests by route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "alsub_http_request_duration_seconds",
            "HTTP request latency by route.",
            ["route"],
            registry=self.registry,
        )

    def observe(self, method: str, route: str, status: int, started: float) -> None:
        """Count one answered request."""
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(time.perf_counter() - started)


class RequestMetricsMiddleware:
    """ASGI middleware counting every HTTP request and its latency by route template.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's `BaseHTTPMiddleware`
    copies every body chunk through an extra stream, which made a 200 MB upload or
    download about half as fast again.
    """

    def __init__(self, app, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception that escapes the app is answered as 500 by Starlette

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # The router writes the matched route into this same scope dict.
            template = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe(scope["method"], template, status, started)
