"""Prometheus metrics, named by Prometheus conventions and labelled by model and version.

The registry is passed in (tests make their own); nothing registers on the global one.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                    0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)

MV = ("model", "version")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self.requests = Counter(
            "visionserve_requests", "Inference requests by endpoint and outcome.",
            [*MV, "endpoint", "outcome"], registry=r)
        self.request_duration = Histogram(
            "visionserve_request_duration_seconds", "Request latency inside the server, body read to answer.",
            [*MV, "endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "visionserve_queue_wait_seconds", "Time an item waited in the batcher's queue.",
            MV, buckets=_LATENCY_BUCKETS, registry=r)
        self.preprocess = Histogram(
            "visionserve_preprocess_seconds", "Decode and preprocessing time of one image.",
            MV, buckets=_LATENCY_BUCKETS, registry=r)
        self.inference = Histogram(
            "visionserve_inference_seconds", "ONNX Runtime time for one batch.",
            MV, buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "visionserve_batch_size", "Items per executed batch.", MV, buckets=_BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge(
            "visionserve_queue_depth", "Items waiting in the batcher's queue.", MV, registry=r)
        self.inflight = Gauge(
            "visionserve_inflight_requests", "Requests being handled.", MV, registry=r)
        self.load_seconds = Gauge(
            "visionserve_model_load_seconds", "Time to load and warm up the model.", MV, registry=r)
        self.ready = Gauge(
            "visionserve_model_ready", "1 when the model serves requests.", MV, registry=r)
        self.info = Gauge(
            "visionserve_model_info", "Execution provider in use (value 1).", [*MV, "provider"], registry=r)
        self.loads = Counter(
            "visionserve_model_loads", "Versions loaded, warmed up and put into service.", MV, registry=r)
        self.unloads = Counter(
            "visionserve_model_unloads", "Versions drained and unloaded.", MV, registry=r)
        self.load_failures = Counter(
            "visionserve_model_load_failures",
            "Versions that failed to load, by cause: manifest, checksum, onnx, provider, warmup.",
            [*MV, "cause"], registry=r)
        self.unavailable = Gauge(
            "visionserve_model_unavailable", "1 while a version cannot serve, labelled by why.",
            [*MV, "cause"], registry=r)
