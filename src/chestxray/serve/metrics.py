"""Prometheus metrics and the access log of `chestxray serve`.

Only counts, timings, route templates, status codes and the model's name are recorded:
never a file name, a query value, an analysis id or anything from an upload. With
several workers (`--workers N`) the serve command points PROMETHEUS_MULTIPROC_DIR at a
fresh folder before the workers start, and `/metrics` adds up every worker's figures
(prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import json
import logging
import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

ACCESS_LOG = "chestxray.serve.access"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
#: Third-party loggers that may quote upload bytes or decoder tracebacks (pydicom is kept quiet
#: during each DICOM read by data/images.py, so its records outside a read still pass).
QUIET_LOGGERS = ("python_multipart", "multipart", "PIL")


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class ServeMetrics:
    """One set of metrics per app (its own registry, so tests can build many apps)."""

    def __init__(self, model: str, backend: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "chestxray_http_requests",
            "HTTP requests by route template and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "chestxray_http_request_duration_seconds",
            "Time from request start to response",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "chestxray_stage_duration_seconds",
            "Time per stage of an upload request",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "chestxray_queue_depth",
            "Upload requests admitted and not yet answered",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.batch_size = Histogram(
            "chestxray_batch_size", "Images per inference batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.decode_refusals = Counter(
            "chestxray_decode_refusals", "Uploads refused before or while decoding, by reason", ["reason"], registry=r
        )
        self.rejections = Counter(
            "chestxray_admission_rejections", "Requests answered 503 by admission control", ["reason"], registry=r
        )
        self.model = Gauge(
            "chestxray_model_info",
            "The model being served (value 1)",
            ["model", "backend"],
            registry=r,
            multiprocess_mode="max",
        )
        self.model.labels(model=model, backend=backend).set(1)

    def render(self) -> bytes:
        if multiprocess():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


def quiet_third_party_loggers() -> None:
    """Silence loggers that can print upload bytes or tracebacks of decoders (their child
    loggers inherit the level). The server reports decode failures itself, in one line."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def access_line(fields: dict[str, object]) -> str:
    return json.dumps(fields, separators=(",", ":"), sort_keys=False)
