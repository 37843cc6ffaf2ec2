"""Prometheus metrics and the request middleware that feeds them and the access log.

With several worker processes (``uvicorn --workers N``, gunicorn), set
``PROMETHEUS_MULTIPROC_DIR`` to an empty folder writable by the server, emptied
before each start: every process then writes its counters there and ``/metrics``,
whichever process answers it, adds them up (prometheus_client's multiprocess mode).
Without it each process reports only its own counts, which is right for one
process only. Gauges of shared state (flags, bank rows, build info) are read from
the database at scrape time (:mod:`modelhash.registry._dbmetrics`); the database
pool's gauges are per process and summed over live processes.

Labels are the method, the route *template* (``/v1/hashes/{algorithm}/{value}``) and
the status, never a path or a hash, so neither the metrics nor the logs can reveal
what anyone looked up. The middleware also caps the request body size (413) and
answers a /v1 body not labelled as JSON with 415, naming the header to send.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import Engine
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Metrics", "RequestMiddleware", "send_error"]

_access = logging.getLogger("modelhash.access")

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The registry's metrics, in a registry of their own (one per app)."""

    def __init__(self, engine: Engine | None = None) -> None:
        self.engine = engine
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "modelhash_http_requests",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "modelhash_http_request_duration_seconds",
            "Time to answer, by method and route template.",
            ["method", "route"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.checked = Counter(
            "modelhash_checked_items",
            "Fingerprints checked, by verdict.",
            ["verdict"],
            registry=self.registry,
        )
        self.lookups = Counter(
            "modelhash_lookups",
            "Exact lookups, by hash strength and whether a flag was found.",
            ["strength", "found"],
            registry=self.registry,
        )

        self.pool = Gauge(
            "modelhash_db_pool_connections",
            "Database connections of the pool: in use, or open and idle (summed over "
            "live processes).",
            ["state"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )

    def observe_pool(self) -> None:
        """Record the pool's connections in use and idle (cheap: no I/O)."""
        pool: Any = self.engine.pool if self.engine is not None else None
        if pool is None or not hasattr(pool, "checkedout"):
            return
        self.pool.labels("in_use").set(pool.checkedout())
        self.pool.labels("idle").set(pool.checkedin())

    def render(self) -> bytes:
        """The text exposition format, every worker's counters included."""
        from modelhash.registry._dbmetrics import DatabaseCollector

        self.observe_pool()
        if self.multiprocess_dir is None:
            registry = self.registry
        else:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        out = bytes(generate_latest(registry))
        if self.engine is not None:
            extra = CollectorRegistry(auto_describe=False)
            extra.register(DatabaseCollector(self.engine))
            out += bytes(generate_latest(extra))
        return out


class RequestMiddleware:
    """Times each request, counts it, logs one JSON line, and gates the body (size, type)."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        limit = self.max_body_bytes

        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await send_error(send, 413, f"request body larger than {limit} bytes")
            self._observe(scope, 413, start)
            return
        if _wrong_body_type(scope, declared):
            # curl's -d sends form encoding by default; say so instead of a
            # validation error about a string that is not an object.
            await send_error(
                send, 415, "send the body as JSON, with the header 'Content-Type: application/json'"
            )
            self._observe(scope, 415, start)
            return

        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"request body larger than {limit} bytes")
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, limited_receive, send_wrapper)
        finally:
            self._observe(scope, status, start)

    def _observe(self, scope: Scope, status: int, start: float) -> None:
        elapsed = time.perf_counter() - start
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        method = scope.get("method", "")
        self.metrics.requests.labels(method, route, str(status)).inc()
        self.metrics.latency.labels(method, route).observe(elapsed)
        self.metrics.observe_pool()
        state: dict[str, Any] = scope.get("state") or {}
        _access.info(
            "request",
            extra={
                "method": method,
                "route": route,
                "status": status,
                "duration_ms": round(elapsed * 1000, 3),
                "matched": state.get("matched"),
                "items": state.get("items"),
            },
        )


def _header(scope: Scope, wanted: bytes) -> bytes | None:
    for name, value in scope.get("headers", []):
        if name == wanted:
            return bytes(value)
    return None


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _wrong_body_type(scope: Scope, declared: int | None) -> bool:
    """A /v1 request with a body that says it is something other than JSON."""
    if scope.get("method") not in {"POST", "PUT", "PATCH"} or not scope["path"].startswith("/v1/"):
        return False
    if declared == 0 or (declared is None and _header(scope, b"transfer-encoding") is None):
        return False
    ctype = _header(scope, b"content-type")
    if ctype is None:
        return True  # FastAPI would not parse it as JSON either
    media = ctype.split(b";", 1)[0].strip().lower()
    return not (media == b"application/json" or media.endswith(b"+json"))


async def send_error(send: Send, status: int, detail: str) -> None:
    """Answer ``{"detail": detail}`` with ``status`` straight from ASGI middleware."""
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
