"""`pickrank serve --engine ray`: the same HTTP API (`server.create_app`, the same routes, parsing, decoding and
score math) as a Ray Serve deployment, one replica per GPU (or `--replicas N`), batched by Ray Serve's own
`@serve.batch` (one call per image, so --max-batch counts images as in the local server).

Each replica loads the model before it takes requests (Ray's proxy routes to it only then) and decodes in threads
of its own process. Ray ships the deployment class with its own serialisation; requests stay JSON, multipart or
safetensors.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np
from ray import serve

from pickrank.options import ModelOptions, Scale
from pickrank.ray.cluster import join_or_start
from pickrank.serve.app import create_app
from pickrank.serve.batching import score_batch
from pickrank.serve.metrics import Metrics
from pickrank.serve.requests import ServeLimits
from pickrank.signals import handlers, set_handlers

log = logging.getLogger("pickrank")


class RayBatcher:
    """The server's batcher on Ray Serve: each image is one call of a `@serve.batch` method, which Ray gathers into
    model calls of up to max_batch images within max_wait; the model runs in one thread of the replica."""

    def __init__(self, embedder: Any, limits: ServeLimits, metrics: Metrics) -> None:
        self.embedder, self.metrics = embedder, metrics
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="pickrank-model")
        self._embed.set_max_batch_size(limits.max_batch)
        self._embed.set_batch_wait_timeout_s(limits.max_wait_ms / 1000)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01)
    async def _embed(self, items: list[tuple[np.ndarray, str]]) -> list[tuple[float, bool]]:
        """One model call over the images Ray gathered: (raw score, truncated) per image."""
        self.metrics.batch_size.observe(len(items))
        loop = asyncio.get_running_loop()
        scores, truncated = await loop.run_in_executor(self.model_thread, score_batch, self.embedder,
                                                       [px for px, _ in items], [p for _, p in items])
        return list(zip(scores.tolist(), truncated))

    async def score(self, pixels: list[np.ndarray], prompts: list[str]) -> tuple[np.ndarray, list[bool]]:
        """Raw scores and truncation flags of one request's images, in order."""
        out = await asyncio.gather(*(self._embed((px, p)) for px, p in zip(pixels, prompts)))
        return np.array([s for s, _ in out], dtype=np.float32), [t for _, t in out]

    async def run(self) -> None:
        """Nothing to run: Ray Serve drives the batches."""

    def close(self) -> None:
        self.model_thread.shutdown(wait=False, cancel_futures=True)


@serve.ingress()
class PickScoreReplica:
    """One replica: the model loaded in it, and the server's app over it."""

    def __init__(self, model: ModelOptions, limits: ServeLimits, token: str | None, scale: str) -> None:
        from pickrank.models.loading import load_embedder

        self.embedder = load_embedder(model).result()
        self.limits, self.token, self.scale = limits, token, scale

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.embedder, self.limits, token=self.token, scale=self.scale, make_batcher=RayBatcher)


def _free_port(host: str) -> int:
    """A port free on host now (Ray Serve's proxy cannot be told port 0)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_ray(model: ModelOptions, limits: ServeLimits, host: str, port: int, token: str | None, scale: Scale,
              replicas: int | None, address: str | None) -> None:
    """Deploy the server on Ray Serve at host:port and serve until SIGTERM or Ctrl-C, then shut it down (drained)."""
    import ray

    join_or_start(address)
    for name in ("ray", "ray.serve"):  # Ray Serve's INFO lines would drown pickrank's own
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        port = port or _free_port(host)
        serve.start(http_options={"host": host, "port": port})
        gpus = int(ray.cluster_resources().get("GPU", 0))
        deployment = serve.deployment(PickScoreReplica, name="pickrank", num_replicas=replicas or max(1, gpus),
                                      ray_actor_options={"num_cpus": 1, "num_gpus": 1 if gpus else 0},
                                      max_ongoing_requests=max(limits.max_queue, 1))
        limits = replace(limits, workers=0)  # a replica decodes in its own threads
        serve.run(deployment.bind(model, limits, token, scale.value), name="pickrank", route_prefix="/")
        where = f"[{host}]" if ":" in host else host
        print(f"pickrank: listening on http://{where}:{port} (Ray Serve, {replicas or max(1, gpus)} replica(s))",
              file=sys.stderr, flush=True)
        _wait_for_stop_signal()
        log.info("stopping: draining the replicas")
    finally:
        with handlers(signal.SIG_IGN):  # a second signal must not cut the drain short
            serve.shutdown()
            ray.shutdown()


def _wait_for_stop_signal() -> None:
    """Block until SIGTERM, SIGINT or SIGHUP (their handlers, Ray's own installed meanwhile among them, are replaced
    for the rest of the run)."""
    stop = threading.Event()
    set_handlers(lambda _n, _f: stop.set())
    while not stop.wait(1.0):
        pass
