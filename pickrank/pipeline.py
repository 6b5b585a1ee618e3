"""Wires the stages in order: discover -> read -> cache -> embed misses in batches -> score/rank -> records.

This module is the one place that knows the order. Images stream through a bounded window of decode jobs
in worker processes, so memory stays flat whatever the number of images; each distinct image (by content)
reaches the model at most once per run, and each distinct prompt is encoded once.

torch is imported only where scores are computed: the CLI hands the engine a model still loading in a thread
(`source.LoadingEmbedder`), and reading, hashing, cache lookups and decoding start before torch is in.
"""

from __future__ import annotations

import collections
import logging
import os
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Protocol, Union

import numpy as np

from .cache import NullCache
from .errors import InputFailed
from .options import RunOptions  # noqa: F401 - declared with the other option bundles; imported from here too
from .reader import (DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, Decoded, ImageSpec, ReadError, close_pool, content_key,
                     decode_job, decode_many, read_bytes, signals_deferred, worker_pool)
from .records import CandidateSet, Query, Record, RunSummary

if TYPE_CHECKING:
    import torch

    from .model import Embedder
    from .source import LoadingEmbedder

    AnyEmbedder = Union[Embedder, LoadingEmbedder]

log = logging.getLogger("pickrank")


def default_workers() -> int:
    """Decode workers: one per CPU the process may use, at most 8 (more only adds start-up time)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(8, n))


@dataclass(frozen=True)
class Ranking:
    """One finished candidate set: its records in output order (query by query, best first)."""

    records: tuple[Record, ...]
    failed: int = 0


class _Decoder:
    """Runs decode jobs in order, in a process pool (workers > 0) or inline; at most `window` jobs in flight, and
    (when `max_bytes` is set) no more once their files add up to `max_bytes`.

    Jobs go to the pool in chunks of a few images: one round trip per chunk keeps the main process's share of the
    work (which competes with the workers for the cores) small.
    """

    def __init__(self, workers: int, window: int, spec: ImageSpec, max_pixels: int | None, chunk: int = 4,
                 max_bytes: int | None = None) -> None:
        self.window, self.max_bytes = max(1, window), max_bytes
        self.spec, self.max_pixels, self.chunk = spec, max_pixels, chunk
        self.pool: ProcessPoolExecutor | None = None
        if workers > 0:
            self.pool = worker_pool(workers)
        self.queue: collections.deque[tuple[object, Future | list, int, int]] = collections.deque()
        self.pending: list[tuple[object, str, bytes]] = []
        self.bytes = 0  # of the files in flight

    def submit(self, tag: object, key: str, data: bytes) -> None:
        if self.pool is None:
            self.queue.append((tag, [decode_job(key, data, self.spec, self.max_pixels)], 0, 0))
            return
        self.pending.append((tag, key, data))
        self.bytes += len(data)
        if len(self.pending) >= self.chunk:
            self._dispatch()

    def _dispatch(self) -> None:
        if self.pending and self.pool is not None:
            jobs = [(key, data) for _, key, data in self.pending]
            with signals_deferred():
                fut = self.pool.submit(decode_many, jobs, self.spec, self.max_pixels)
            self.queue.extend((tag, fut, i, len(data)) for i, (tag, _, data) in enumerate(self.pending))
            self.pending = []

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.pending)

    @property
    def full(self) -> bool:
        jobs = len(self.queue) + len(self.pending)
        return jobs >= self.window or (self.max_bytes is not None and jobs > 0 and self.bytes >= self.max_bytes)

    def pop(self) -> tuple[object, Decoded | str]:
        if not self.queue:
            self._dispatch()
        tag, holder, i, nbytes = self.queue.popleft()
        self.bytes -= nbytes
        return tag, (holder.result() if isinstance(holder, Future) else holder)[i]

    def close(self) -> None:
        if self.pool is not None:
            close_pool(self.pool)
            self.pool = None


@dataclass
class _SetState:
    """A candidate set in flight: its entries (path, key or None, error or None) and how many keys it waits on."""

    cset: CandidateSet
    entries: list[tuple[str, str | None, str | None]] = field(default_factory=list)
    waiting: int = 0
    exhausted: bool = False


# What a backend hands back for finished work: embedded keys with their (N, D) fp32 embeddings on the CPU (None
# when there are none), and the keys that failed, with the reason.
Done = tuple[list[str], "torch.Tensor | None", list[tuple[str, str]]]


class Backend(Protocol):
    """Where the cache misses are decoded and embedded: `Engine.run` submits each miss once, polls for finished
    work, and expects every submitted key back exactly once (embedded or failed)."""

    full: bool  # too much in flight: the engine polls (blocking) before submitting more

    def submit(self, key: str, data: bytes) -> None: ...

    def poll(self, block: bool) -> list[Done]: ...

    def finish(self) -> None: ...  # no more submits: poll(block=True) now returns what is left

    def close(self) -> None: ...  # always called, also after an error or Ctrl-C


class _LocalBackend:
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

    def __init__(self, embedder: AnyEmbedder, options: RunOptions) -> None:
        self.embedder = embedder
        self.workers = default_workers() if options.workers is None else options.workers
        self._batch_size = options.batch_size  # None: the embedder's, known once it has loaded
        self.loading = not getattr(embedder, "ready", True)
        window = self._running_window(options.batch_size or 8)
        deeper = self.loading and self.workers > 0  # (inline decoding needs no queue)
        self.decoder = _Decoder(self.workers, window=max(window, self.LOADING_WINDOW) if deeper else window,
                                spec=embedder.spec, max_pixels=options.max_pixels,
                                max_bytes=self.LOADING_BYTES if deeper else None)
        self.batch: list[Decoded] = []
        self.held_bytes = 0
        self.finished = False
        self.saved_threads: int | None = None

    def _running_window(self, batch_size: int) -> int:
        return max(2 * batch_size, 8 * self.workers)

    @property
    def batch_size(self) -> int:
        if self._batch_size is None:
            self._batch_size = self.embedder.batch_size  # waits for the load
        return self._batch_size

    def _loaded(self) -> bool:
        """Whether the model is ready; the first time it is, the decode window takes its running size."""
        if self.loading and getattr(self.embedder, "ready", True):
            self.loading = False
            self.decoder.window, self.decoder.max_bytes = self._running_window(self.batch_size), None
        return not self.loading

    def submit(self, key: str, data: bytes) -> None:
        self.decoder.submit(key, key, data)

    @property
    def full(self) -> bool:
        return self.decoder.full

    def finish(self) -> None:
        self.finished = True

    def poll(self, block: bool) -> list[Done]:
        """Decode results while the window is full (after finish: all of them), and a batch's embeddings each time
        one is full and the model is ready (after finish: all the rest). Non-blocking polls return nothing here."""
        out: list[Done] = []
        if not block:
            return out
        while self.decoder.busy and (self.decoder.full or self.finished):
            key, result = self.decoder.pop()
            if isinstance(result, str):
                out.append(([], None, [(key, result)]))
                continue
            self.batch.append(result)
            self.held_bytes += result.pixels.nbytes
            if (self._loaded() or self.held_bytes > self.HOLD_BYTES) and len(self.batch) >= self.batch_size:
                out.append(self._embed())
        while self.finished and self.batch:
            out.append(self._embed())
        return out

    def _embed(self) -> Done:
        """Embed the oldest batch_size decoded images."""
        if self.saved_threads is None:
            self._pick_threads()
        batch, self.batch = self.batch[:self.batch_size], self.batch[self.batch_size:]
        self.held_bytes -= sum(d.pixels.nbytes for d in batch)
        return [d.key for d in batch], self.embedder.embed_images(np.stack([d.pixels for d in batch])), []

    def _pick_threads(self) -> None:
        """One intra-op thread for a small vision tower on the CPU, beside decode workers (process-wide until
        close(), as torch's setting is)."""
        import torch  # loaded with the model by now

        self.saved_threads = torch.get_num_threads()
        try:
            small = self.embedder.device.type == "cpu" and self.embedder.image_gflops < self.SMALL_MODEL_GFLOPS
        except AttributeError:  # an embedder around a model without a CLIP vision config: leave threads alone
            small = False
        if small and self.workers > 0:
            torch.set_num_threads(1)

    def close(self) -> None:
        self.decoder.close()
        if self.saved_threads is not None:
            import torch

            torch.set_num_threads(self.saved_threads)


class _Prompts:
    """A run's distinct prompts, encoded once, on first use: image decoding starts while the model still loads.

    Per distinct image the engine keeps its scores against every prompt (P floats) when that is smaller than the
    embedding, else the embedding; either way memory per image is small and bounded by min(P, D).
    """

    def __init__(self, embedder: AnyEmbedder, sets: list[CandidateSet], summary: RunSummary) -> None:
        self.embedder, self.summary = embedder, summary
        prompts = dict.fromkeys(q.prompt for s in sets if s.error is None for q in s.queries)
        self.index = {p: i for i, p in enumerate(prompts)}
        self._text: torch.Tensor | None = None
        self._truncated: dict[str, bool] = {}

    @property
    def text(self) -> torch.Tensor:
        """The normalised prompt embeddings (P, D), in index order (waits for the model)."""
        if self._text is None and not self.index:  # every set failed before it had a prompt
            import torch

            self._text = torch.empty(0, 0)
        if self._text is None:
            text, truncated = self.embedder.embed_texts(list(self.index))
            self._truncated = dict(zip(self.index, truncated))
            for p, t in self._truncated.items():
                if t:
                    log.warning("prompt longer than 77 tokens, truncated as the reference does: %r",
                                p if len(p) <= 80 else p[:77] + "...")
                    self.summary.truncated_prompts.append(p)
            self._text = text
        return self._text

    @property
    def truncated(self) -> dict[str, bool]:
        """Which prompts were cut at 77 tokens (the flags come with the encoding)."""
        self.text  # noqa: B018 - encodes the prompts if that has not happened yet
        return self._truncated

    @property
    def keep_scores(self) -> bool:
        return len(self.index) <= self.text.shape[1]

    def to_memo(self, emb: torch.Tensor | np.ndarray) -> torch.Tensor:
        """What the run keeps per image, from (N, D) embeddings. One matrix-vector product per image: the result
        does not depend on which batch the image came in."""
        import torch  # loaded with the model by now

        from .score import pick_scores

        emb = torch.as_tensor(emb)
        if not self.keep_scores:
            return emb
        return torch.stack([pick_scores(self.text, e[None], self.embedder.scale)[:, 0] for e in emb])

    def score_of(self, v: torch.Tensor, pi: int) -> float:
        """The score of prompt `pi` from what to_memo kept."""
        from .score import pick_scores

        if self.keep_scores:
            return float(v[pi])
        return float(pick_scores(self.text[pi:pi + 1], v[None], self.embedder.scale))


class Engine:
    """Scores candidate sets with one embedder and cache; `run` yields each Ranking as soon as it completes.

    Reading, hashing, the cache, scoring and ranking happen here; the misses go to a backend, made on the first
    miss (so a fully cached run starts no worker): decode processes and this process by default, or what `backend`
    makes (`ray_engine.RayEngine` passes one that runs them on a Ray cluster).
    """

    def __init__(self, embedder: AnyEmbedder, cache: NullCache | None = None, options: RunOptions | None = None,
                 on_progress: Callable[[int], None] | None = None,
                 backend: Callable[[], Backend] | None = None) -> None:
        self.embedder = embedder
        self.cache = cache or NullCache()
        self.options = options or RunOptions()
        self.on_progress = on_progress
        self.summary = RunSummary()
        self.make_backend = backend or (lambda: _LocalBackend(self.embedder, self.options))

    # -- the run -----------------------------------------------------------------------------------------
    def run(self, sets: Iterable[CandidateSet]) -> Iterator[Ranking]:
        """Stream all sets' images through read -> cache -> backend (decode, embed) and yield finished rankings in
        order."""
        sets = list(sets)
        prompts = _Prompts(self.embedder, sets, self.summary)
        to_memo = prompts.to_memo
        memo: dict[str, torch.Tensor] = {}
        failed_keys: dict[str, str] = {}
        waiters: dict[str, list[_SetState]] = {}
        states: collections.deque[_SetState] = collections.deque()
        opts = self.options
        model_fp = self.embedder.fingerprint
        backend: Backend | None = None

        def fail(path: str, reason: str) -> None:
            self.summary.failures += 1
            log.warning("%s: %s", path, reason)
            if opts.on_error == "fail":
                raise InputFailed(f"{path}: {reason}")

        def resolve(key: str, vec: torch.Tensor | None, reason: str | None = None) -> None:
            if vec is not None:
                memo[key] = vec
            else:
                failed_keys[key] = reason or "failed"
            for st in waiters.pop(key, []):
                st.waiting -= 1
                if reason is not None:
                    for path, k, _ in st.entries:
                        if k == key:
                            fail(path, reason)

        def take(done: list[Done]) -> None:
            """Finished work from the backend: failures reported; embeddings cached (per batch) and memoised."""
            for keys, emb, failures in done:
                for key, reason in failures:
                    resolve(key, None, reason)
                    if self.on_progress:
                        self.on_progress(1)
                if keys:
                    self.summary.embedded += len(keys)
                    self.cache.put_many({k: emb[i].numpy() for i, k in enumerate(keys)}, model_fp)
                    vecs = to_memo(emb)
                    for i, k in enumerate(keys):
                        resolve(k, vecs[i])
                    if self.on_progress:
                        self.on_progress(len(keys))

        def finished() -> Iterator[Ranking]:
            while states and states[0].exhausted and states[0].waiting == 0:
                yield self._rank(states.popleft(), memo, failed_keys, prompts)

        try:
            for cset in sets:
                st = _SetState(cset)
                states.append(st)
                if cset.error is None:
                    seen_in_set: set[str] = set()
                    for path in cset.paths:
                        self.summary.images += 1
                        try:
                            data = read_bytes(path, opts.max_bytes)
                        except ReadError as e:
                            st.entries.append((path, None, str(e)))
                            fail(path, str(e))
                            if self.on_progress:
                                self.on_progress(1)
                            continue
                        key = content_key(data)
                        st.entries.append((path, key, None))
                        if key in seen_in_set:
                            continue  # a copy under another name: scored once, reported for each name
                        seen_in_set.add(key)
                        if key in memo or key in failed_keys:
                            if key in failed_keys:
                                fail(path, failed_keys[key])
                            continue
                        st.waiting += 1
                        if key in waiters:
                            waiters[key].append(st)
                            continue
                        waiters[key] = [st]
                        hit = self.cache.get_many([key], model_fp).get(key)
                        if hit is not None:
                            self.summary.cache_hits += 1
                            resolve(key, to_memo(hit[None])[0])
                            if self.on_progress:
                                self.on_progress(1)
                            continue
                        if backend is None:
                            backend = self.make_backend()
                        backend.submit(key, data)
                        del data
                        while backend.full:
                            take(backend.poll(block=True))
                        take(backend.poll(block=False))
                        yield from finished()
                st.exhausted = True
                yield from finished()
            if backend is not None:
                backend.finish()
                while waiters:
                    done = backend.poll(block=True)
                    if not done:  # a backend must answer every key it took
                        raise RuntimeError(f"{type(backend).__name__} returned no result for {len(waiters)} image(s)")
                    take(done)
                    yield from finished()
            yield from finished()
        finally:
            if backend is not None:
                backend.close()

    def _rank(self, st: _SetState, memo: dict[str, torch.Tensor], failed_keys: dict[str, str],
              prompts: "_Prompts") -> Ranking:
        import torch  # loaded with the model by now

        from .score import ranks, softmax_probs

        cset = st.cset
        records: list[Record] = []
        top = self.options.top
        if cset.error is not None:
            for q in cset.queries:
                records.append(Record(prompt=q.prompt or None, path=cset.source, id=q.id, group=q.group,
                                      error=cset.error))
            return Ranking(tuple(records), failed=1)
        ok = [(p, k) for p, k, e in st.entries if e is None and k is not None and k in memo]
        errors = [(p, e if e is not None else failed_keys.get(k or "", "failed")) for p, k, e in st.entries
                  if not (e is None and k is not None and k in memo)]
        truncated = prompts.truncated
        for q in cset.queries:
            pi = prompts.index[q.prompt]
            scores = [prompts.score_of(memo[k], pi) for _, k in ok]
            probs = softmax_probs(torch.tensor(scores, dtype=torch.float32)).tolist() if scores else []
            rk = ranks(scores)
            order = sorted(range(len(ok)), key=lambda i: rk[i])
            for i in order:
                if top is not None and rk[i] > top:
                    break
                records.append(Record(prompt=q.prompt, path=ok[i][0], score=scores[i], prob=probs[i], rank=rk[i],
                                      id=q.id, group=q.group, truncated=truncated.get(q.prompt, False)))
            for path, reason in errors:
                records.append(Record(prompt=q.prompt, path=path, id=q.id, group=q.group, error=reason,
                                      truncated=truncated.get(q.prompt, False)))
        self.summary.rankings += len(cset.queries)
        return Ranking(tuple(records), failed=len(errors))


def single_set(prompt: str, paths: Iterable[str]) -> CandidateSet:
    """One prompt over one candidate set (the `score` command)."""
    return CandidateSet(queries=(Query(prompt=prompt),), paths=paths)


def with_copied(record: Record, dest: str) -> Record:
    """The record, noting where its image was copied."""
    return replace(record, copied_to=dest)
