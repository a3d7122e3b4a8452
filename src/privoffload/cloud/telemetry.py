"""What the operator sees: Prometheus metrics and one JSON log line per request.

Logs carry the route, status, latency, image count and model version: never request bodies,
tensors or tokens. Each app has its own metrics registry, so several apps can live in one process.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger("privoffload.cloud")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object: time, level, message, and the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": round(record.created, 3), "level": record.levelname.lower(), "event": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(out, default=str)


def setup_logging(level: str = "info") -> None:
    """JSON lines on stderr for the service and for uvicorn's own messages."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("privoffload.cloud", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler] if name != "uvicorn.error" else []
        logger.setLevel(level.upper())
        logger.propagate = name == "uvicorn.error"  # uvicorn.error reaches the handler through uvicorn


def event(name: str, level: int = logging.INFO, **fields) -> None:
    log.log(level, name, extra={"fields": fields})


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("privoffload_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("privoffload_request_seconds", "HTTP request latency", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("privoffload_images", "images classified", ["model"], registry=r)
        self.batch_images = Histogram("privoffload_batch_images", "images per model forward pass", buckets=SIZE_BUCKETS,
                                      registry=r)
        self.batch_requests = Histogram("privoffload_batch_requests", "requests per model forward pass",
                                        buckets=SIZE_BUCKETS, registry=r)
        self.version = Gauge("privoffload_model_version", "version being served", ["model"], registry=r)
        self.loads = Counter("privoffload_model_loads", "model load requests by result", ["model", "result"], registry=r)
        self.dropped = Counter("privoffload_dropped_requests", "inference requests not run: queue full, client gone, "
                               "deadline passed", ["model", "reason"], registry=r)
        self.restarts = Counter("privoffload_batcher_restarts", "batching workers restarted after dying", ["model"],
                                registry=r)


class Observe:
    """ASGI middleware: count, time and log every HTTP request (the route template, not the raw path)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500  # if the app raises, the error middleware outside answers 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(seconds)
            state = scope.get("state", {})
            fields = {"method": scope["method"], "route": route, "status": status, "ms": round(seconds * 1000, 2)}
            fields.update({k: state[k] for k in ("model", "model_version", "images", "error") if k in state})
            event("request", logging.WARNING if status >= 500 else logging.INFO, **fields)
