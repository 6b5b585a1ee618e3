"""The reward server's Prometheus metrics."""

from __future__ import annotations

from pickrank.inputs.imagestats import STAT_NAMES, ImageStats

# Histogram buckets of each image statistic (`serve --signals`), on its scale (README, "Watch a training run").
_UNIT = tuple(round(0.05 * i, 2) for i in range(1, 20))
STAT_BUCKETS: dict[str, tuple[float, ...]] = {
    "saturation": _UNIT, "brightness": _UNIT, "contrast": (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5),
    "colourfulness": (10, 20, 33, 45, 59, 82, 109, 150, 200), "sharpness": (10, 30, 100, 300, 1000, 3000, 10000),
    "hf_energy": (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.6)}


class Metrics:
    """The server's Prometheus metrics, on a registry of its own (two apps in one process do not clash); with
    `signals`, a histogram per image statistic."""

    def __init__(self, max_batch: int, signals: bool = False) -> None:
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
        self.stats = {name: Histogram(f"pickrank_image_{name}", f"Image statistic {name} of the images scored",
                                      buckets=buckets, registry=self.registry)
                      for name, buckets in STAT_BUCKETS.items()} if signals else {}

    def observe_stats(self, stats: ImageStats) -> None:
        """One scored image's statistics into their histograms."""
        for name, value in zip(STAT_NAMES, stats.values()):
            self.stats[name].observe(value)


__all__ = ["Metrics"]
