"""Prometheus metrics of the listener and the DICOMweb client (own registry); only counts,
reasons and timings: never a UID or a patient tag."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


class PacsMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.received = Counter("chestxray_pacs_received", "Instances received", registry=r)
        self.analysed = Counter("chestxray_pacs_analysed", "Instances analysed", registry=r)
        self.skipped = Counter("chestxray_pacs_skipped", "Instances not analysed, by reason", ["reason"], registry=r)
        self.sent = Counter("chestxray_pacs_sent", "Result objects (SR, SC) delivered", registry=r)
        self.failed = Counter("chestxray_pacs_failed", "Instances given up after the last retry", registry=r)
        self.retries = Counter("chestxray_pacs_retries", "Send attempts that will be retried", registry=r)
        self.latency = Histogram(
            "chestxray_pacs_latency_seconds",
            "Time from receipt of an instance to its results delivered",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)
