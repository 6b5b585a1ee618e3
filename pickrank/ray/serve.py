"""`pickrank serve --engine ray`: the same HTTP API (`server.create_app`, the same routes, parsing, decoding and
score math) as a Ray Serve deployment, one replica per GPU (or `--replicas N`; on CPUs each replica declares its
share of the cluster's cores, which Ray gives its torch as threads), batched by Ray Serve's own `@serve.batch` (one
call per image, so --max-batch counts images as in the local server).

Connections, header timeouts and malformed HTTP are Ray Serve's proxy's to handle, not `serve.server`'s guards;
everything from the request body on is the app's, as in the local server.

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
from pickrank.serve.batching import Group, score_groups
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
    async def _embed(self, items: list[tuple[np.ndarray, str, int]]) -> list[tuple[float, bool] | Exception]:
        """One model call over the images Ray gathered (`score_groups`, grouped by request: a failure is only its
        own request's): (raw score, truncated), or the request's error, per image."""
        self.metrics.batch_size.observe(len(items))
        groups: dict[int, Group] = {}
        for px, prompt, request in items:
            groups.setdefault(request, ([], []))[0].append(px)
            groups[request][1].append(prompt)
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self.model_thread, score_groups, self.embedder, list(groups.values()))
        by_request = dict(zip(groups, results))
        taken = dict.fromkeys(groups, 0)
        out: list[tuple[float, bool] | Exception] = []
        for _, _, request in items:
            result = by_request[request]
            if isinstance(result, Exception):
                out.append(result)
                continue
            i = taken[request]
            taken[request] += 1
            out.append((float(result[0][i]), result[1][i]))
        return out

    async def score(self, pixels: list[np.ndarray], prompts: list[str]) -> tuple[np.ndarray, list[bool]]:
        """Raw scores and truncation flags of one request's images, in order."""
        request = id(pixels)  # unique while this request waits
        out = await asyncio.gather(*(self._embed((px, p, request)) for px, p in zip(pixels, prompts)))
        failed = next((r for r in out if isinstance(r, Exception)), None)
        if failed is not None:
            raise failed
        return np.array([s for s, _ in out], dtype=np.float32), [t for _, t in out]  # type: ignore[misc]

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


def replica_resources(replicas: int, gpus: int, cpus: float) -> dict:
    """What each replica declares: a GPU and a CPU where the cluster has GPUs; else its share of the cores (Ray sets
    an actor's OMP_NUM_THREADS to its CPUs, and torch takes that many threads: one CPU would be one thread)."""
    if gpus:
        return {"num_cpus": 1, "num_gpus": 1}
    return {"num_cpus": max(1, int(cpus) // replicas), "num_gpus": 0}


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
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        count = replicas or max(1, gpus)
        deployment = serve.deployment(PickScoreReplica, name="pickrank", num_replicas=count,
                                      ray_actor_options=replica_resources(count, gpus, resources.get("CPU", 1)),
                                      max_ongoing_requests=max(limits.max_queue, 1))
        limits = replace(limits, workers=0)  # a replica decodes in its own threads
        serve.run(deployment.bind(model, limits, token, scale.value), name="pickrank", route_prefix="/")
        where = f"[{host}]" if ":" in host else host
        print(f"pickrank: listening on http://{where}:{port} (Ray Serve, {count} replica(s))",
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
