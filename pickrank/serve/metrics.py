"""The reward server's Prometheus metrics."""

from __future__ import annotations


class Metrics:
    """The server's Prometheus metrics, on a registry of its own (two apps in one process do not clash)."""

    def __init__(self, max_batch: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("pickrank_requests", "HTTP requests answered", ["endpoint", "status"],
                                registry=self.registry)
        self.images = Counter("pickrank_images", "Images scored", registry=self.registry)
        buckets = sorted({2 ** i for i in range(max_batch.bit_length())} | {max_batch})
        self.batch_size = Histogram("pickrank_batch_size", "Images per model call", buckets=buckets,
                                    registry=self.registry)
        self.queue = Gauge("pickrank_queue_images", "Images accepted and not yet answered", registry=self.registry)
        self.latency = Histogram("pickrank_request_seconds", "Request latency", ["endpoint"],
                                 registry=self.registry)


__all__ = ["Metrics"]
