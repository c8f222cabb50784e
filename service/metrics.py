"""Prometheus metrics of one app (its own registry, no globals) and the ASGI middleware that times every request."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

audit_log = logging.getLogger("ltd.audit")

# request latencies here run from ~0.3 ms (a cached label row) to seconds (a large predict batch)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    """Request latency, label reads, inference latency and job counts, in a registry owned by one app."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ltd_http_requests", "HTTP requests by route template and status",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("ltd_http_request_duration_seconds", "HTTP request latency by route template",
                                 ["method", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.label_rows = Counter("ltd_label_rows_read", "Soft-label rows served, by labelset", ["labelset"],
                                  registry=r)
        self.label_latency = Histogram("ltd_label_read_duration_seconds", "Time in the store reader per request",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.inference_latency = Histogram("ltd_inference_duration_seconds", "Decode + batched forward per request",
                                           ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference_images = Counter("ltd_inference_images", "Images classified, by model", ["model"], registry=r)
        self.auth_failures = Counter("ltd_auth_failures", "Requests refused for a missing or wrong X-API-Key, by "
                                     "method and API section (labelsets, jobs, models)", ["method", "section"],
                                     registry=r)
        self.jobs_submitted = Counter("ltd_jobs_submitted", "Jobs submitted (retries included), by kind", ["kind"],
                                      registry=r)
        self.jobs = Gauge("ltd_jobs", "Job records by state (read from the job database at scrape time)", ["state"],
                          registry=r)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self, job_counts: dict[str, int]) -> bytes:
        """The text exposition format, with the job gauge refreshed from `job_counts` first."""
        for state, count in job_counts.items():
            self.jobs.labels(state).set(count)
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware overhead): labels each request by its route template, not its raw path."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client sees if the app raises before starting a response
        start = time.perf_counter()

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")  # set by the router once a route matched
            template = getattr(route, "path_format", None) or "unmatched"  # {id}, without its convertor
            self.metrics.observe_request(scope["method"], template, status, time.perf_counter() - start)
            if is_mutation(scope["method"], template):
                audit(scope, template, status)


READ_POSTS = (":batch", ":predict")  # POSTs that only read (a body too large for a query string)


def is_mutation(method: str, template: str) -> bool:
    return method in ("POST", "PUT", "PATCH", "DELETE") and not template.endswith(READ_POSTS)


def audit(scope, template: str, status: int) -> None:
    """One JSON line per mutation attempt on the `ltd.audit` logger: time, endpoint, client, ids, outcome."""
    client = scope.get("client")
    record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "method": scope["method"],
              "endpoint": template, "path": scope.get("path"), "ids": scope.get("path_params", {}),
              "client": f"{client[0]}:{client[1]}" if client else None, "status": status,
              "outcome": "ok" if status < 400 else "refused" if status in (401, 403) else "error"}
    audit_log.info(json.dumps(record))
