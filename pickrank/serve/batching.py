"""The reward server's work off the event loop: decoding in the worker pool (or threads), and dynamic batching
of every request's images into model calls, which run in one thread of their own."""

from __future__ import annotations

import asyncio
import collections
import logging
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pickrank.inputs.decode import Decoded, ImageSpec
from pickrank.inputs.files import ReadError, TooLarge
from pickrank.inputs.workers import close_pool, decode_many, worker_pool
from pickrank.serve.metrics import Metrics
from pickrank.serve.requests import ApiError, ServeLimits

if TYPE_CHECKING:
    from pickrank.models.protocol import ImageTextEmbedder

log = logging.getLogger("pickrank")

_DECODE_CHUNK = 4  # encoded images per round trip to a decode worker


class Decoders:
    """Decoding and preprocessing off the event loop: encoded images in the CLI's worker pool (`workers.decode_many`,
    the same limits), pixel arrays in threads (`decode.image_pixels`, Pillow releases the GIL while it resizes)."""

    def __init__(self, workers: int) -> None:
        self.pool = worker_pool(workers) if workers > 0 else None
        self.threads = ThreadPoolExecutor(max(2, workers), thread_name_prefix="pickrank-decode")

    async def pixels(self, images: list[bytes | np.ndarray], spec: ImageSpec,
                     max_pixels: int | None) -> list[np.ndarray]:
        """Preprocessed uint8 (3, H, W) pixels per image, in order; a 422 (413 over max_pixels) naming the failed."""
        from pickrank.inputs.decode import image_pixels

        loop = asyncio.get_running_loop()
        encoded = [(str(i), im) for i, im in enumerate(images) if isinstance(im, bytes)]
        chunks = [encoded[i:i + _DECODE_CHUNK] for i in range(0, len(encoded), _DECODE_CHUNK)]
        pool: Executor = self.pool or self.threads
        futures = [asyncio.wrap_future(pool.submit(decode_many, c, spec, max_pixels)) for c in chunks]
        arrays = {i: loop.run_in_executor(self.threads, image_pixels, im, spec, None)
                  for i, im in enumerate(images) if not isinstance(im, bytes)}
        results: dict[int, Decoded | ReadError] = {}
        for chunk, out in zip(chunks, await asyncio.gather(*futures)):
            results.update((int(k), r) for (k, _), r in zip(chunk, out))
        for i, px in zip(arrays, await asyncio.gather(*arrays.values())):
            results[i] = Decoded(str(i), px)
        failed = [(i, r) for i, r in sorted(results.items()) if isinstance(r, ReadError)]
        if failed:
            status = 413 if any(isinstance(r, TooLarge) for _, r in failed) else 422
            raise ApiError(status, "; ".join(f"images[{i}]: {r}" for i, r in failed[:8]))
        return [results[i].pixels for i in range(len(images))]  # type: ignore[union-attr]

    def close(self) -> None:
        if self.pool is not None:
            close_pool(self.pool)
        self.threads.shutdown(wait=False, cancel_futures=True)
def score_batch(embedder: ImageTextEmbedder, pixels: list[np.ndarray],
                prompts: list[str]) -> tuple[np.ndarray, list[bool]]:
    """Raw PickScores of pixel i against prompt i, in one model call (the engine's Batcher and score math)."""
    from pickrank.core.engine import Batcher, encode_paired
    from pickrank.core.scores import paired_scores

    batcher = Batcher(embedder)
    for i, px in enumerate(pixels):
        batcher.add(Decoded(str(i), px))
    images = batcher.embed(len(batcher)).embeddings
    text, truncated = encode_paired(embedder, prompts, warn=False)
    return np.asarray(paired_scores(text, images, embedder.scale, embedder.head), dtype=np.float32), truncated


@dataclass
class _Job:
    """One request's images waiting for the model; `taken` of them are in a batch, `done` answered."""

    pixels: list[np.ndarray]
    prompts: list[str]
    future: asyncio.Future
    scores: np.ndarray = field(init=False)
    truncated: list[bool] = field(init=False)
    taken: int = 0
    done: int = 0

    def __post_init__(self) -> None:
        self.scores = np.zeros(len(self.pixels), dtype=np.float32)
        self.truncated = [False] * len(self.pixels)


class DynamicBatcher:
    """Gathers the requests that arrive within max_wait into model calls of up to max_batch images (a larger
    request is split across calls); the model runs in one thread of its own, never on the event loop."""

    def __init__(self, embedder: ImageTextEmbedder, limits: ServeLimits, metrics: Metrics) -> None:
        self.embedder, self.limits, self.metrics = embedder, limits, metrics
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.pending: collections.deque[_Job] = collections.deque()
        self.pending_images = 0
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="pickrank-model")

    async def score(self, pixels: list[np.ndarray], prompts: list[str]) -> tuple[np.ndarray, list[bool]]:
        """Raw scores and truncation flags of one request's images, in order."""
        job = _Job(pixels, prompts, asyncio.get_running_loop().create_future())
        self.queue.put_nowait(job)
        return await job.future

    def _add(self, job: _Job) -> None:
        self.pending.append(job)
        self.pending_images += len(job.pixels)

    async def _gather(self) -> None:
        """Wait for a first request, then for more until max_batch images or max_wait has passed."""
        loop = asyncio.get_running_loop()
        if not self.pending:
            self._add(await self.queue.get())
        deadline = loop.time() + self.limits.max_wait_ms / 1000
        while self.pending_images < self.limits.max_batch:
            if self.queue.empty():
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    self._add(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            else:
                self._add(self.queue.get_nowait())

    def _take(self) -> list[tuple[_Job, int, int]]:
        """The next model call: (job, start, stop) slices of up to max_batch images, oldest first."""
        slices, room = [], self.limits.max_batch
        while self.pending and room:
            job = self.pending[0]
            k = min(room, len(job.pixels) - job.taken)
            if not job.future.done():  # a client that went away is not scored
                slices.append((job, job.taken, job.taken + k))
                room -= k
            job.taken += k
            self.pending_images -= k
            if job.taken == len(job.pixels):
                self.pending.popleft()
        return slices

    async def _call(self, slices: list[tuple[_Job, int, int]]) -> None:
        """One model call over the slices; each job is answered once all its images are."""
        pixels = [px for job, a, b in slices for px in job.pixels[a:b]]
        prompts = [p for job, a, b in slices for p in job.prompts[a:b]]
        self.metrics.batch_size.observe(len(pixels))
        loop = asyncio.get_running_loop()
        try:
            scores, truncated = await loop.run_in_executor(self.model_thread, score_batch, self.embedder, pixels,
                                                           prompts)
        except Exception as e:  # the model failed this batch: its requests get a 500, the server goes on
            log.error("model call failed: %s: %s", type(e).__name__, e)
            for job, _, _ in slices:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        off = 0
        for job, a, b in slices:
            job.scores[a:b], job.truncated[a:b] = scores[off:off + b - a], truncated[off:off + b - a]
            off += b - a
            job.done += b - a
            if job.done == len(job.pixels) and not job.future.done():
                job.future.set_result((job.scores, job.truncated))

    async def run(self) -> None:
        """The batching task: forever gather, take, call."""
        while True:
            await self._gather()
            slices = self._take()
            if slices:
                await self._call(slices)

    def close(self) -> None:
        self.model_thread.shutdown(wait=False, cancel_futures=True)


__all__ = ["Decoders", "score_batch", "DynamicBatcher"]
