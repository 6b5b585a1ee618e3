"""Where cache misses are decoded and embedded: the `Backend` protocol the engine drives, and the local backend
(decode jobs in a bounded process pool, then `Batcher`: images embedded in batches in this process)."""

from __future__ import annotations

import collections
import os
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

import numpy as np

from pickrank.inputs.decode import Decoded, ImageSpec
from pickrank.inputs.files import ReadError
from pickrank.inputs.workers import close_pool, decode_job, decode_many, worker_pool
from pickrank.options import RunOptions
from pickrank.records import Finished
from pickrank.signals import signals_deferred

if TYPE_CHECKING:
    from pickrank.models.protocol import ImageTextEmbedder


def default_workers() -> int:
    """Decode workers: one per CPU the process may use, at most 8 (more only adds start-up time)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(8, n))


class Batcher:
    """Decoded images waiting for the model, embedded the oldest `n` at a time: the one place where pixels are
    batched and embedded (the local backend and `PickScorer.embed_images` both use it)."""

    def __init__(self, embedder: ImageTextEmbedder) -> None:
        self.embedder = embedder
        self.items: list[Decoded] = []
        self.nbytes = 0  # of the pixels held

    def __len__(self) -> int:
        return len(self.items)

    def add(self, decoded: Decoded) -> None:
        self.items.append(decoded)
        self.nbytes += decoded.pixels.nbytes

    def embed(self, n: int) -> Finished:
        """Embed the oldest n images, in one call."""
        batch, self.items = self.items[:n], self.items[n:]
        self.nbytes -= sum(d.pixels.nbytes for d in batch)
        return Finished([d.key for d in batch], self.embedder.embed_images(np.stack([d.pixels for d in batch])),
                        stats=tuple(d.stats for d in batch))


class _Decoder:
    """Runs decode jobs in order, in a process pool (workers > 0; a thread pool with `threads`) or inline; at most
    `window` jobs in flight, and (when `max_bytes` is set) no more once their files add up to `max_bytes`.

    Jobs go to the pool in chunks of a few images: one round trip per chunk keeps the main process's share of the
    work (which competes with the workers for the cores) small.
    """

    def __init__(self, workers: int, window: int, spec: ImageSpec, max_pixels: int | None, chunk: int = 4,
                 max_bytes: int | None = None, threads: bool = False, stats: bool = False) -> None:
        self.window, self.max_bytes, self.stats = max(1, window), max_bytes, stats
        self.spec, self.max_pixels, self.chunk = spec, max_pixels, chunk
        self.pool: Executor | None = None
        if workers > 0:
            # Pillow decodes and resizes without the GIL, so threads decode in parallel too.
            self.pool = ThreadPoolExecutor(workers, thread_name_prefix="pickrank-decode") if threads \
                else worker_pool(workers)
        self.queue: collections.deque[tuple[str, Future | list, int, int]] = collections.deque()
        self.pending: list[tuple[str, bytes]] = []
        self.bytes = 0  # of the files in flight

    def submit(self, key: str, data: bytes) -> None:
        if self.pool is None:
            self.queue.append((key, [decode_job(key, data, self.spec, self.max_pixels, self.stats)], 0, 0))
            return
        self.pending.append((key, data))
        self.bytes += len(data)
        if len(self.pending) >= self.chunk:
            self._dispatch()

    def _dispatch(self) -> None:
        if self.pending and self.pool is not None:
            with signals_deferred():
                fut = self.pool.submit(decode_many, self.pending, self.spec, self.max_pixels, self.stats)
            self.queue.extend((key, fut, i, len(data)) for i, (key, data) in enumerate(self.pending))
            self.pending = []

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.pending)

    @property
    def full(self) -> bool:
        jobs = len(self.queue) + len(self.pending)
        return jobs >= self.window or (self.max_bytes is not None and jobs > 0 and self.bytes >= self.max_bytes)

    def pop(self) -> tuple[str, Decoded | ReadError]:
        if not self.queue:
            self._dispatch()
        key, holder, i, nbytes = self.queue.popleft()
        self.bytes -= nbytes
        return key, (holder.result() if isinstance(holder, Future) else holder)[i]

    def close(self) -> None:
        if self.pool is not None:
            close_pool(self.pool)
            self.pool = None


class Backend(Protocol):
    """Where the cache misses are decoded and embedded: the engine submits each miss once, polls for finished
    work, and expects every submitted key back exactly once (embedded or failed)."""

    full: bool  # too much in flight: the engine polls (blocking) before submitting more

    def submit(self, key: str, data: bytes) -> None: ...

    # poll(block=True) returns some finished work (at least one result while any is pending), poll(block=False)
    # what is ready now (maybe nothing)
    def poll(self, block: bool) -> list[Finished]: ...

    def flush(self) -> None: ...  # polls now return all submitted so far, over as many polls as it takes

    def finish(self) -> None: ...  # no more submits: polls now return what is left

    def close(self) -> None: ...  # always called, also after an error or Ctrl-C


class LocalBackend:
    """Decodes misses in the bounded process pool and embeds them in batches, in this process."""

    # While the model still loads, decoded images are held back (up to this many bytes of pixels) instead of
    # stopping the decode workers: start-up and decoding overlap, and memory stays bounded.
    HOLD_BYTES = 128 << 20
    # On a CPU, a vision tower this small (GFLOPs per image) spends more time handing work between intra-op threads
    # than computing: one thread runs it faster and leaves the other cores to the decode workers. PickScore's
    # ViT-H/14 is ~335.
    SMALL_MODEL_GFLOPS = 1.0
    # Decode jobs in flight while the model loads: this thread then gets the GIL only between the loader's turns,
    # and a deeper queue keeps the decode workers busy meanwhile; at most LOADING_BYTES of files (128 4K PNGs
    # would be gigabytes).
    LOADING_WINDOW = 128
    LOADING_BYTES = 64 << 20

    def __init__(self, embedder: ImageTextEmbedder, options: RunOptions, tune_threads: bool = True,
                 batch_size: int | None = None) -> None:
        self.embedder, self.tune_threads = embedder, tune_threads
        self.workers = default_workers() if options.workers is None else options.workers
        self._batch_size = batch_size  # --batch-size; None: the embedder's, known once it has loaded
        self.loading = not embedder.ready
        window = self._running_window(batch_size or 8)
        deeper = self.loading and self.workers > 0  # (inline decoding needs no queue)
        self.decoder = _Decoder(self.workers, window=max(window, self.LOADING_WINDOW) if deeper else window,
                                spec=embedder.spec, max_pixels=options.max_pixels,
                                max_bytes=self.LOADING_BYTES if deeper else None, threads=options.threads,
                                stats=options.signals)
        self.batcher = Batcher(embedder)
        self.finished = self.flushing = False
        self.saved_threads: int | None = None

    def _running_window(self, batch_size: int) -> int:
        return max(2 * batch_size, 8 * self.workers)

    @property
    def batch_size(self) -> int:
        if self._batch_size is None:
            self._batch_size = self.embedder.batch_size  # waits for the load
        return self._batch_size

    def model_ready(self) -> bool:
        """Whether the model is ready; the first time it is, the decode window takes its running size."""
        if self.loading and self.embedder.ready:
            self.loading = False
            self.decoder.window, self.decoder.max_bytes = self._running_window(self.batch_size), None
        return not self.loading

    def submit(self, key: str, data: bytes) -> None:
        self.decoder.submit(key, data)

    @property
    def full(self) -> bool:
        return self.decoder.full

    def flush(self) -> None:
        self.flushing = True

    def finish(self) -> None:
        self.finished = True

    def poll(self, block: bool) -> list[Finished]:
        """Decode results while the window is full (after flush or finish: all of them), up to and including one
        batch's embeddings, once one is full and the model is ready (after flush or finish: the rest, a batch per
        poll). One model call per poll: the engine takes each batch as it is embedded (its cache and its progress
        move with it). Non-blocking polls return nothing here."""
        out: list[Finished] = []
        if not block:
            return out
        drain = self.finished or self.flushing
        while self.decoder.busy and (self.decoder.full or drain):
            key, result = self.decoder.pop()
            if isinstance(result, ReadError):
                out.append(Finished(failures=[(key, str(result))]))
                continue
            self.batcher.add(result)
            if (self.model_ready() or self.batcher.nbytes > self.HOLD_BYTES) and len(self.batcher) >= self.batch_size:
                out.append(self._embed())
                return out
        if drain and self.batcher:
            out.append(self._embed())
            return out
        self.flushing = False  # everything submitted before the flush has been returned
        return out

    def _embed(self) -> Finished:
        """Embed the oldest batch_size decoded images."""
        if self.saved_threads is None:
            self._pick_threads()
        return self.batcher.embed(self.batch_size)

    def _pick_threads(self) -> None:
        """One intra-op thread for a small vision tower on the CPU, beside decode workers (process-wide until
        close(), as torch's setting is). ONNX Runtime keeps its own threads: left as they are."""
        if self.embedder.backend != "torch":
            self.saved_threads = 0  # nothing to restore
            return
        import torch  # loaded with the model by now

        self.saved_threads = torch.get_num_threads()
        try:
            small = self.embedder.device.type == "cpu" and self.embedder.image_gflops < self.SMALL_MODEL_GFLOPS
        except AttributeError:  # an embedder around a model without a CLIP vision config: leave threads alone
            small = False
        if small and self.workers > 0 and self.tune_threads:
            torch.set_num_threads(1)

    def close(self) -> None:
        self.decoder.close()
        if self.saved_threads:  # None: never set; 0: not torch's to restore
            import torch

            torch.set_num_threads(self.saved_threads)
