"""The metric objects of API.md, in a registry of their own per app (so tests can build many apps).

With `--workers N` the supervisor points `PROMETHEUS_MULTIPROC_DIR` at a fresh directory before it starts
the workers (prometheus-client reads the variable when it is imported): every worker then writes its values
to files there, and `/metrics` in any worker renders the sum over all of them (`MultiProcessCollector`).
Counters and histograms of a worker that died stay in the sum, so totals never go back. The gauges say how
they combine: `vit_queue_depth` is the sum over the live workers (images accepted by the whole server and
not yet answered), `vit_model_load_seconds` the longest load and warm-up among the live workers (how long
the slowest worker took to be ready with that model).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """vit_requests_total, vit_request_duration_seconds, vit_images_total, vit_batch_size, vit_queue_depth,
    vit_model_load_seconds; beyond API.md, vit_decoder_restarts_total."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "vit_requests", "HTTP requests by route template and status", ["endpoint", "status"], registry=r
        )
        self.duration = Histogram(
            "vit_request_duration_seconds",
            "HTTP request latency by route template",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter(
            "vit_images", "images answered, by model and route template", ["model", "endpoint"], registry=r
        )
        self.batch_size = Histogram(
            "vit_batch_size", "images per forward pass", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "vit_queue_depth",
            "images accepted and not yet answered (decoding, waiting or running)",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.load_seconds = Gauge(
            "vit_model_load_seconds",
            "time to load and warm up a model",
            ["model"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.decoder_restarts = Counter(
            "vit_decoder_restarts", "decoding process pools replaced after one of their processes died", registry=r
        )
        # several processes (--workers): the exposition is the aggregate of every process's files
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        self._aggregate: CollectorRegistry | None = None
        if self.multiprocess_dir:
            self._aggregate = CollectorRegistry()
            MultiProcessCollector(self._aggregate, path=self.multiprocess_dir)

    def render(self) -> bytes:
        return generate_latest(self._aggregate or self.registry)
