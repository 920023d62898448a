"""Prometheus metrics of one service instance (own registry, so several apps in one process do not clash).

- ``albef_http_requests_total{method,route,status}`` and ``albef_http_request_duration_seconds{route}``:
  ``route`` is the route template (``/v1/items/{item_id}``), never the raw path, to bound cardinality.
- ``albef_stage_duration_seconds{stage}``: decode, encode_text, encode_image, ann, features, rerank.
- ``albef_batch_size{stage}``: items per model call of each micro-batcher; ``albef_queue_depth{stage}``.
- ``albef_queue_rejections_total{stage}``: requests answered 503 because a queue was full.
- ``albef_index_items{kind}``, ``albef_index_info{version,bundle}``, ``albef_index_reloads_total{result}``.
- ``process_*`` (CPU seconds, resident memory, open files, start time) of the serving process.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

# No `*_created` series: they double the series count and no dashboard of ours reads them (process-wide).
disable_created_metrics()

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# The label values the service uses (engine: the micro-batchers and the upload decoder; state: hot swaps).
REJECTION_STAGES = ("decode", "encode_text", "encode_image", "rerank")
RELOAD_RESULTS = ("ok", "error")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "albef_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "albef_http_request_duration_seconds",
            "HTTP request latency",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_latency = Histogram(
            "albef_stage_duration_seconds",
            "latency of each search stage",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "albef_batch_size",
            "items per model call of a micro-batcher",
            ["stage"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "albef_queue_depth", "items waiting in a micro-batcher queue", ["stage"], registry=r
        )
        self.rejections = Counter(
            "albef_queue_rejections", "requests refused because a queue was full", ["stage"], registry=r
        )
        self.index_items = Gauge(
            "albef_index_items", "items in the served index version", ["kind"], registry=r
        )
        self.index_info = Gauge(
            "albef_index_info", "the served index version (value 1)", ["version", "bundle"], registry=r
        )
        self.reloads = Counter(
            "albef_index_reloads", "index hot-swap attempts by result", ["result"], registry=r
        )
        self.ready = Gauge("albef_ready", "1 when the model bundle and the index are loaded", registry=r)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        # Every known label has a sample from the start: a rate() over "no series yet" is no rate at all.
        for stage in REJECTION_STAGES:
            self.rejections.labels(stage=stage)
        for result in RELOAD_RESULTS:
            self.reloads.labels(result=result)

    def watch_queue(self, stage: str, depth: Callable[[], float]) -> None:
        self.queue_depth.labels(stage=stage).set_function(depth)

    def on_batch(self, stage: str, size: int, seconds: float) -> None:
        self.batch_size.labels(stage=stage).observe(size)

    def set_index(self, version: str, bundle_id: str, counts: dict[str, int]) -> None:
        self.index_info.clear()
        self.index_info.labels(version=version, bundle=bundle_id[:12]).set(1)
        for kind, n in counts.items():
            self.index_items.labels(kind=kind).set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StageTimer:
    """``with timer("ann"): ...`` records the stage's seconds in the histogram and in ``timings`` (ms)."""

    def __init__(self, metrics: Metrics | None, timings: dict[str, float]) -> None:
        self.metrics = metrics
        self.timings = timings

    def __call__(self, stage: str) -> _Stage:
        return _Stage(self, stage)


class _Stage:
    def __init__(self, owner: StageTimer, stage: str) -> None:
        self.owner = owner
        self.stage = stage

    def __enter__(self) -> _Stage:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        dt = time.perf_counter() - self.t0
        self.owner.timings[self.stage] = self.owner.timings.get(self.stage, 0.0) + dt * 1000.0
        if self.owner.metrics is not None:
            self.owner.metrics.stage_latency.labels(stage=self.stage).observe(dt)
