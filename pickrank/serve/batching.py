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


def array_pixels(key: str, image: np.ndarray, spec: ImageSpec, max_pixels: int | None,
                 stats: bool = False) -> Decoded | ReadError:
    """A pixel array preprocessed (`decode.image_decoded`, its resize bounded by max_pixels as an encoded image's
    is; with `stats`, its statistics), or why not as a ReadError (`TooLarge`: a 413), returned rather than raised."""
    from pickrank.inputs.decode import image_decoded

    try:
        return image_decoded(key, image, spec, max_pixels, stats)
    except ReadError as e:
        return e


class Decoders:
    """Decoding and preprocessing off the event loop: encoded images in the CLI's worker pool (`workers.decode_many`,
    the same limits), pixel arrays in threads (`decode.image_pixels`, Pillow releases the GIL while it resizes)."""

    def __init__(self, workers: int) -> None:
        self.pool = worker_pool(workers) if workers > 0 else None
        self.threads = ThreadPoolExecutor(max(2, workers), thread_name_prefix="pickrank-decode")

    async def decode(self, images: list[bytes | np.ndarray], spec: ImageSpec, max_pixels: int | None,
                     stats: bool = False) -> list[Decoded]:
        """Each image decoded (preprocessed uint8 (3, H, W) pixels; with `stats`, their statistics), in order; a 422
        (413 over max_pixels) naming the failed."""
        loop = asyncio.get_running_loop()
        encoded = [(str(i), im) for i, im in enumerate(images) if isinstance(im, bytes)]
        chunks = [encoded[i:i + _DECODE_CHUNK] for i in range(0, len(encoded), _DECODE_CHUNK)]
        pool: Executor = self.pool or self.threads
        futures = [asyncio.wrap_future(pool.submit(decode_many, c, spec, max_pixels, stats)) for c in chunks]
        arrays = {i: loop.run_in_executor(self.threads, array_pixels, str(i), im, spec, max_pixels, stats)
                  for i, im in enumerate(images) if not isinstance(im, bytes)}
        results: dict[int, Decoded | ReadError] = {}
        for chunk, out in zip(chunks, await asyncio.gather(*futures)):
            results.update((int(k), r) for (k, _), r in zip(chunk, out))
        results.update(zip(arrays, await asyncio.gather(*arrays.values())))
        failed = [(i, r) for i, r in sorted(results.items()) if isinstance(r, ReadError)]
        if failed:
            status = 413 if any(isinstance(r, TooLarge) for _, r in failed) else 422
            raise ApiError(status, "; ".join(f"images[{i}]: {r}" for i, r in failed[:8]))
        return [results[i] for i in range(len(images))]  # type: ignore[misc]

    def close(self) -> None:
        if self.pool is not None:
            close_pool(self.pool)
        self.threads.shutdown(wait=False, cancel_futures=True)
def score_batch(embedder: ImageTextEmbedder, pixels: list[np.ndarray],
                prompts: list[str]) -> tuple[np.ndarray, list[bool]]:
    """Raw PickScores of pixel i against prompt i, in one model call (the engine's Batcher and score math)."""
    from pickrank.core.backend import Batcher
    from pickrank.core.engine import encode_paired
    from pickrank.core.scores import paired_scores

    batcher = Batcher(embedder)
    for i, px in enumerate(pixels):
        batcher.add(Decoded(str(i), px))
    images = batcher.embed(len(batcher)).embeddings
    text, truncated = encode_paired(embedder, prompts, warn=False)
    return np.asarray(paired_scores(text, images, embedder.scale, embedder.head), dtype=np.float32), truncated


Group = tuple[list[np.ndarray], list[str]]  # one caller's images and their prompts
Scored = tuple[np.ndarray, list[bool]]


def _alone(embedder: ImageTextEmbedder, group: Group) -> Scored | Exception:
    """One caller's group scored alone: its scores, or its own error (a 400 when the text encoder refuses its
    prompts)."""
    from pickrank.core.engine import encode_paired

    try:
        return score_batch(embedder, *group)
    except Exception as e:  # noqa: BLE001 - the caller's own failure, handed back to it alone
        try:
            encode_paired(embedder, group[1], warn=False)
        except Exception as text_error:  # noqa: BLE001 - any refusal of the text is the caller's request's fault
            return ApiError(400, f"prompts: the text encoder refuses them: {type(text_error).__name__}: "
                                 f"{text_error}")
        return e


def score_groups(embedder: ImageTextEmbedder, groups: list[Group]) -> list[Scored | Exception]:
    """Several callers' groups in one model call, each group's (scores, truncated) in order; when that call fails,
    each group is scored alone, so that no caller fails because of another's content (a failed group gets its own
    exception)."""
    if len(groups) == 1:
        return [_alone(embedder, groups[0])]
    try:
        scores, truncated = score_batch(embedder, [px for g in groups for px in g[0]],
                                        [p for g in groups for p in g[1]])
    except Exception as e:  # noqa: BLE001 - one group's content may be the cause: find it by scoring each alone
        log.warning("a model call over %d requests failed (%s: %s): scoring each alone", len(groups),
                    type(e).__name__, e)
        return [_alone(embedder, g) for g in groups]
    out: list[Scored | Exception] = []
    off = 0
    for pixels, _ in groups:
        out.append((scores[off:off + len(pixels)], truncated[off:off + len(pixels)]))
        off += len(pixels)
    return out


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
        """One model call over the slices (`score_groups`: a failure is only its own request's); each job is
        answered once all its images are, or at its first failure."""
        groups = [(job.pixels[a:b], job.prompts[a:b]) for job, a, b in slices]
        self.metrics.batch_size.observe(sum(len(px) for px, _ in groups))
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self.model_thread, score_groups, self.embedder, groups)
        for (job, a, b), result in zip(slices, results):
            if job.future.done():
                continue
            if isinstance(result, Exception):
                if not isinstance(result, ApiError):
                    log.error("model call failed for one request: %s: %s", type(result).__name__, result)
                job.future.set_exception(result)
                continue
            job.scores[a:b], job.truncated[a:b] = result
            job.done += b - a
            if job.done == len(job.pixels):
                job.future.set_result((job.scores, job.truncated))

    async def run(self) -> None:
        """The batching task: forever gather, take, call (whatever fails, the task goes on)."""
        while True:
            await self._gather()
            slices = self._take()
            if not slices:
                continue
            try:
                await self._call(slices)
            except Exception as e:  # noqa: BLE001 - e.g. the model thread is gone: these requests fail, not all
                log.error("model call failed: %s: %s", type(e).__name__, e)
                for job, _, _ in slices:
                    if not job.future.done():
                        job.future.set_exception(e)

    def close(self) -> None:
        self.model_thread.shutdown(wait=False, cancel_futures=True)


__all__ = ["Decoders", "score_batch", "Group", "Scored", "score_groups", "DynamicBatcher"]
