"""`--engine ray`: the local engine's run, with decoding and embedding spread over a Ray cluster.

The driver does what the local engine does up to the cache: it discovers paths, reads bytes, hashes them, dedupes
by content and asks the embedding cache. Only the misses leave the driver, in chunks of about one model batch:

    driver --ray.put(chunk)--> feed actor --> source task --> decode tasks (CPU) --> embedding actors (GPU/CPU)
       ^                                                                                     |
       +---------------------------- embeddings (fp32) back through iter_batches -----------+

One Ray Dataset runs for the whole run, so every embedding actor loads the model once. Its input is fed while it
runs: the driver puts chunks into a small feed actor and a single source task yields them into the dataset; a
window bounds the images in flight, so memory stays flat whatever the number of images. Each dataset row is a
whole chunk, so a chunk reaches the actors as one model batch and its embeddings come back as soon as they exist.
Decode tasks call `workers.decode_job` and the actors `Embedder.embed_images`: the same units as the local
engine. `_RayStream` is the `pipeline.Backend` a RayEngine gives its `pipeline.Engine`, which keeps everything else:
reading, the cache (filled per chunk), scoring and ranking.

Ray is optional (`pip install 'pickrank[ray]'`): this module imports it only when a RayEngine is made. Nor does it
import torch at load time, so that decode tasks, which import it on every worker, stay small.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np

from pickrank.errors import ModelLoadError, PickrankError, RayClusterError, UsageError
from pickrank.inputs.decode import ImageSpec
from pickrank.inputs.files import ReadError
from pickrank.inputs.workers import decode_job
from pickrank.options import DType
from pickrank.ray.cluster import first_line, join_or_start, plain, require_ray
from pickrank.records import Finished, Progress

if TYPE_CHECKING:
    from pickrank.core.cache import NullCache
    from pickrank.core.engine import Ranking
    from pickrank.models.torch_embedder import Embedder, ModelSource
    from pickrank.options import RunOptions
    from pickrank.records import CandidateSet

log = logging.getLogger("pickrank")

DEFAULT_CPU_ACTORS = 2
# A chunk (one dataset row) holds at least this many images (fewer at the end) and at most this many bytes.
CHUNK_MIN_IMAGES = 32
CHUNK_MAX_BYTES = 64 << 20
# Images and bytes in flight between the driver and the results (in the object store, not the driver's heap).
WINDOW_MIN_IMAGES = 256
WINDOW_MAX_BYTES = 1 << 30
_DTYPE_NAMES = {f"torch.{d.torch_name}": d.value for d in DType}  # str(torch dtype) -> our name


# -- remote side: the feed, the source task, decode tasks and the embedding actors ----------------------------------

_feed_cls = None


def _feed_actor(ray):
    """A tiny async actor between the driver and the source task: chunk refs numbered by the driver go out in that
    order (an async actor may run calls out of order), then None once `close(total)` has been handed out."""
    global _feed_cls
    if _feed_cls is None:
        import asyncio

        class _Feed:
            def __init__(self) -> None:
                self.items: dict[int, object] = {}
                self.next = 0
                self.total: int | None = None
                self.changed = asyncio.Condition()

            async def put(self, seq: int, item) -> None:
                async with self.changed:
                    self.items[seq] = item
                    self.changed.notify_all()

            async def close(self, total: int) -> None:
                async with self.changed:
                    self.total = total
                    self.changed.notify_all()

            async def abort(self) -> None:
                async with self.changed:
                    self.items.clear()
                    self.total = self.next
                    self.changed.notify_all()

            async def get(self):
                async with self.changed:
                    while True:
                        if self.total is not None and self.next >= self.total:
                            return None
                        if self.next in self.items:
                            self.next += 1
                            return self.items.pop(self.next - 1)
                        await self.changed.wait()

        _feed_cls = ray.remote(num_cpus=0)(_Feed)
    return _feed_cls


def _source(batch, feed) -> Iterator[dict]:
    """The dataset's only input task: yields one row per chunk the driver feeds, until the feed ends."""
    import ray

    while True:
        item = ray.get(feed.get.remote())
        if item is None:
            return
        keys, datas = ray.get(item[0])
        yield {"keys": [keys], "data": [datas]}


def _decode_chunks(batch, spec: ImageSpec, max_pixels: int | None) -> dict:
    """Decode task: each row is a chunk; decodes with the local engine's job, keeps the reason for bad images."""
    out: dict[str, list] = {"keys": [], "errors": [], "pixels": [], "shape": []}
    for keys, datas in zip(batch["keys"], batch["data"]):
        errors, pixels = [], []
        for key, data in zip(keys, datas):
            result = decode_job(str(key), bytes(data), spec, max_pixels)
            if isinstance(result, ReadError):
                errors.append(str(result))
            else:
                errors.append("")
                pixels.append(result.pixels)
        stacked = np.stack(pixels) if pixels else np.zeros((0, 3, 1, 1), dtype=np.uint8)
        out["keys"].append([str(k) for k in keys])
        out["errors"].append(errors)
        out["pixels"].append(stacked.tobytes())
        out["shape"].append(list(stacked.shape))
    return out


class _EmbedActor:
    """Embedding actor: loads the Embedder once, then embeds each chunk with `Embedder.embed_images`."""

    def __init__(self, source: ModelSource, device: str, dtype: str, batch_size: int, fingerprint: str,
                 threads: int | None = None, alpha: str = "white", decode: str = "exact") -> None:
        import torch

        from pickrank.models.source import inspect_model
        from pickrank.models.torch_embedder import Embedder

        if threads:
            torch.set_num_threads(threads)
        # the driver's preprocessing choices (--alpha, --decode) are part of the fingerprint the worker must match
        info = inspect_model(source, dtype, alpha, decode)
        self.embedder = Embedder.load(source, device=device, dtype=dtype, batch_size=batch_size, info=info)
        _check_same_model(self.embedder.fingerprint, fingerprint, source)
        self.dim = int(self.embedder.model.config.projection_dim)

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"keys": [], "errors": [], "emb": []}
        for keys, errors, pixels, shape in zip(batch["keys"], batch["errors"], batch["pixels"], batch["shape"]):
            px = np.frombuffer(pixels, dtype=np.uint8).reshape([int(s) for s in shape])
            emb = self.embedder.embed_images(px).numpy() if len(px) else np.zeros((0, self.dim), np.float32)
            out["keys"].append(list(keys))
            out["errors"].append(list(errors))
            out["emb"].append(np.ascontiguousarray(emb, dtype=np.float32).tobytes())
        return out


def _check_same_model(got: str, want: str, source: ModelSource) -> None:
    """A worker must embed with what the driver's cache fingerprint names: same dtype and preprocessing, and for a
    hub model the same revision (a local folder's copies may differ in mtime, so only its name is compared)."""
    g_ident, _, g_rest = got.partition("|")
    w_ident, _, w_rest = want.partition("|")
    same_ident = g_ident.split("@")[0] == w_ident.split("@")[0] if source.model_is_local else g_ident == w_ident
    if g_rest != w_rest or not same_ident:
        raise ModelLoadError(f"the model on a Ray worker ({got}) differs from the driver's ({want})")


# -- driver side ---------------------------------------------------------------------------------------------------

_WORKER_ERROR = re.compile(r"pickrank\.errors\.(\w+): ([^\n]*)")


def _pickrank_cause(e: BaseException) -> PickrankError | None:
    """A PickrankError raised on a worker (e.g. ModelLoadError in an actor), wherever Ray wrapped it: as an object
    (a failed task's `cause`) or only as the text of the remote traceback (a failed actor constructor)."""
    from pickrank import errors

    seen: set[int] = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, PickrankError):
            return x
        found = _WORKER_ERROR.findall(plain(str(getattr(x, "error_msg", None) or x)))
        if found:
            cls = getattr(errors, found[-1][0], None)
            if isinstance(cls, type) and issubclass(cls, PickrankError):
                return cls(found[-1][1])
        stack += [getattr(x, "cause", None), x.__cause__, x.__context__]
    return None


class ActorPlan:
    """How many embedding actors, on what, with what resources; decode tasks' share; chunk and window sizes."""

    def __init__(self, resources: dict, actors: int | None, batch_size: int | None) -> None:
        cpus = float(resources.get("CPU", 1))
        gpus = int(resources.get("GPU", 0))
        if gpus >= 1:
            # Decoding is what feeds the GPUs: one task per CPU left after one CPU per actor.
            self.actors = min(actors or gpus, gpus)
            self.num_gpus, self.device = 1, "cuda"
            self.actor_cpus = 1.0 if cpus >= self.actors + 1 else 0.0
            self.decode_cpus = 1.0
            self.threads = None
            self.batch_size = batch_size or 32
        else:
            # The actors share all CPUs but one, where decode tasks (half a CPU each) run two at a time.
            self.actors = actors or DEFAULT_CPU_ACTORS
            self.num_gpus, self.device = 0, "cpu"
            share = max(0.0, (cpus - 1) / self.actors)
            self.actor_cpus = float(int(share)) if share >= 1 else round(share, 2)
            self.decode_cpus = 0.5
            self.threads = max(1, int(share))
            self.batch_size = batch_size or 8
        # A chunk is one dataset row: one decode task, one actor call (split into batch_size model calls).
        self.chunk = max(CHUNK_MIN_IMAGES, self.batch_size)
        self.window = max(WINDOW_MIN_IMAGES, 16 * self.chunk * self.actors)


def _worker_source(embedder: Embedder) -> ModelSource:
    """What the actors load: the driver's model, by absolute path (workers do not run in the driver's working
    directory), or for a hub model the driver's exact commit."""
    source = embedder.source
    if source is None:
        raise UsageError("--engine ray needs an Embedder loaded with Embedder.load (it has no model source)")
    if source.model_is_local:
        source = replace(source, model=os.path.abspath(source.model))
    elif embedder.revision:
        source = replace(source, revision=embedder.revision)
    if os.path.isdir(source.processor):
        source = replace(source, processor=os.path.abspath(source.processor))
    return source


def _build_dataset(ray, feed, embedder: Embedder, plan: ActorPlan, max_pixels: int | None):
    """The run's one Dataset: the source task fed by `feed`, decode tasks, then the pool of embedding actors."""
    actor_kwargs = {"source": _worker_source(embedder), "device": plan.device,
                    "dtype": _DTYPE_NAMES.get(str(embedder.dtype), "fp32"), "batch_size": plan.batch_size,
                    "fingerprint": embedder.fingerprint, "threads": plan.threads, "alpha": embedder.spec.alpha,
                    "decode": embedder.spec.decode}
    return (
        ray.data.range(1, override_num_blocks=1)
        .map_batches(_source, batch_size=1, num_cpus=0, fn_kwargs={"feed": feed})
        .map_batches(_decode_chunks, batch_size=1, num_cpus=plan.decode_cpus,
                     fn_kwargs={"spec": embedder.spec, "max_pixels": max_pixels})
        .map_batches(_EmbedActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=plan.actors),
                     num_cpus=plan.actor_cpus, num_gpus=plan.num_gpus or None, fn_constructor_kwargs=actor_kwargs)
    )


class _DataContext:
    """Ray Data settings for the run, restored after it: each yielded row (a chunk) its own block, or chunks would
    wait in the source for others to fill a block (a stall once the window is full); no progress bars on stderr.
    Set for the whole run: Ray 2.30 reads the current context when the dataset executes, newer versions the one
    captured when it is built."""

    def __init__(self, ray) -> None:
        self.ctx = ray.data.DataContext.get_current()
        self.saved = self.ctx.target_max_block_size, self.ctx.enable_progress_bars
        self.ctx.target_max_block_size = 1
        self.ctx.enable_progress_bars = False

    def restore(self) -> None:
        self.ctx.target_max_block_size, self.ctx.enable_progress_bars = self.saved


class _Results:
    """The thread that iterates the dataset (which runs it) and queues its batches, its end, or its error."""

    def __init__(self, ds) -> None:
        self.ds = ds
        self.queue: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._consume, name="pickrank-ray-results", daemon=True)
        self.thread.start()

    def _consume(self) -> None:
        it = None
        try:
            it = iter(self.ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1))
            for batch in it:
                if self.stop.is_set():
                    break
                self.queue.put(("batch", batch))
            self.queue.put(("end", None))
        except BaseException as e:  # handed to the driver's thread, which raises it
            self.queue.put(("error", e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    pass

    def get(self, block: bool) -> tuple[str, object] | None:
        """The next (kind, value), waiting up to a second when `block`; None when there is none yet."""
        try:
            return self.queue.get(block=block, timeout=1.0)
        except queue.Empty:
            if block and not self.thread.is_alive():
                raise RayClusterError("the Ray results thread ended unexpectedly") from None
            return None


class _RayStream:
    """The one Dataset of a run, as a `pipeline.Backend`: chunks go in with `submit`, finished chunks (keys,
    embeddings, failures) come out of `poll`."""

    def __init__(self, ray, embedder: Embedder, plan: ActorPlan, max_pixels: int | None) -> None:
        self.ray, self.plan = ray, plan
        self.feed = _feed_actor(ray).remote()
        # The pool's input is one source task, which Ray Data takes for a lack of parallelism: it is not one here.
        warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)
        self.ctx = _DataContext(ray)
        try:
            self.results = _Results(_build_dataset(ray, self.feed, embedder, plan, max_pixels))
        except BaseException:
            self.ctx.restore()
            raise
        self.ended = self.finished = False
        self.keys: list[str] = []  # the chunk being filled, and its bytes
        self.datas: list[bytes] = []
        self.chunk_bytes = 0
        self.sent = 0  # chunks handed to the feed
        self.in_flight = 0  # images submitted and not answered yet, and their bytes
        self.in_flight_bytes = 0
        self.sizes: dict[str, int] = {}

    # -- input ----------------------------------------------------------------------------------------------------
    def submit(self, key: str, data: bytes) -> None:
        self.keys.append(key)
        self.datas.append(data)
        self.chunk_bytes += len(data)
        self.sizes[key] = len(data)
        self.in_flight += 1
        self.in_flight_bytes += len(data)
        if len(self.keys) >= self.plan.chunk or self.chunk_bytes >= CHUNK_MAX_BYTES:
            self.send()

    def send(self) -> None:
        if not self.keys:
            return
        ref = self.ray.put((self.keys, self.datas))
        # In a list, so that the feed holds the ref and the bytes go from here straight to the source task.
        self.feed.put.remote(self.sent, [ref])
        self.sent += 1
        self.keys, self.datas, self.chunk_bytes = [], [], 0

    @property
    def full(self) -> bool:
        return self.in_flight >= self.plan.window or self.in_flight_bytes >= WINDOW_MAX_BYTES

    def flush(self) -> None:
        """Send the chunk being filled: everything submitted so far comes back."""
        self.send()

    def finish(self) -> None:
        """No more input: send the last chunk and end the feed once the source has taken everything."""
        self.send()
        self.feed.close.remote(self.sent)
        self.finished = True

    # -- output ---------------------------------------------------------------------------------------------------
    def poll(self, block: bool) -> list[Finished]:
        """Finished chunks; block: wait for at least one."""
        out: list[Finished] = []
        if self.ended and block:
            raise RayClusterError(f"the Ray dataset ended without results for {self.in_flight} image(s)")
        while not self.ended:
            got = self.results.get(block=block and not out)
            if got is None:
                if out or not block:
                    break
                continue
            kind, value = got
            if kind == "error":
                raise value  # type: ignore[misc]
            if kind == "end":
                self.ended = True
                break
            out.extend(self._unpack(value))  # type: ignore[arg-type]
        return out

    def _unpack(self, batch: dict) -> Iterator[Finished]:
        import torch

        for keys, errors, emb in zip(batch["keys"], batch["errors"], batch["emb"]):
            keys, errors = [str(k) for k in keys], [str(e) for e in errors]
            ok = [k for k, e in zip(keys, errors) if not e]
            vecs = np.frombuffer(emb, dtype=np.float32).reshape(len(ok), -1).copy()
            for k in keys:
                self.in_flight -= 1
                self.in_flight_bytes -= self.sizes.pop(k, 0)
            yield Finished(ok, torch.from_numpy(vecs), [(k, e) for k, e in zip(keys, errors) if e])

    def close(self) -> None:
        """After a complete run, let the dataset end; otherwise (an error, Ctrl-C) stop feeding and end it without
        waiting for the chunks in flight (killing the feed fails the source task, which stops the dataset)."""
        done = self.finished and self.in_flight == 0
        if not done:
            self.results.stop.set()
            try:
                self.feed.abort.remote()
            except Exception:
                pass
        self.results.thread.join(timeout=10 if done else 1)
        try:
            self.ray.kill(self.feed)
        except Exception:
            pass
        self.ctx.restore()


class RayEngine:
    """Engine's interface and results (`rank` yields Rankings in order; `summary`): a `pipeline.Engine` whose
    backend decodes and embeds the misses on a Ray cluster.

    address: a Ray address (`ray://host:10001`, `host:6379`, `auto`); None: $RAY_ADDRESS, else a local Ray
    started for the run (and stopped after it). A Ray already initialised in this process is used as it is.
    actors: embedding actors on a cluster without GPUs (default 2); with GPUs, one per GPU (at most `actors`).
    batch_size: images per model call on the actors (--batch-size; None: 32 with GPUs, else 8).
    """

    def __init__(self, embedder: Embedder, cache: NullCache | None = None, options: RunOptions | None = None,
                 on_progress: Callable[[Progress], None] | None = None, address: str | None = None,
                 actors: int | None = None, batch_size: int | None = None) -> None:
        self.ray = require_ray()
        from pickrank.core.engine import Engine

        self.engine = Engine(embedder, cache, options, on_progress, backend=self._backend)
        self.embedder, self.cache, self.options = self.engine.embedder, self.engine.cache, self.engine.options
        self.address = address
        self.actors = actors
        self.batch_size = batch_size  # --batch-size; None: the plan's default for the cluster's devices
        self._started = False

    @property
    def summary(self):
        """The run's RunSummary (counts for the CLI's last line)."""
        return self.engine.summary

    def _connect(self) -> bool:
        """Connect to (or start) Ray; True when this run started it and must stop it."""
        started = join_or_start(self.address)
        if started:
            logging.getLogger("ray.data").setLevel(logging.ERROR)
        return started

    def _backend(self) -> _RayStream:
        """Engine.rank asks for it on the first cache miss: Ray starts only when some image needs the model."""
        self._started = self._connect() or self._started
        return _RayStream(self.ray, self.embedder, self._plan(), self.options.max_pixels)

    def rank(self, sets: Iterable[CandidateSet]) -> Iterator[Ranking]:
        """Engine.rank with the misses decoded and embedded on Ray; Ray's errors become one-line PickrankErrors."""
        return self._on_ray(self.engine.rank(sets))

    def rank_open(self, sets: Iterable[CandidateSet]) -> Iterator[Ranking]:
        """Engine.rank_open (a dataset's stream of sets) with the misses decoded and embedded on Ray."""
        return self._on_ray(self.engine.rank_open(sets))

    def _on_ray(self, ranked: Iterator[Ranking]) -> Iterator[Ranking]:
        """The engine's rankings; Ray's errors become one-line PickrankErrors, and a Ray this run started stops."""
        self._started = False
        try:
            yield from ranked
        except PickrankError:
            raise
        except Exception as e:
            if not _is_ray_error(e):
                raise
            cause = _pickrank_cause(e)
            if cause is not None:
                raise type(cause)(f"on a Ray worker: {cause}") from e
            kept = "; embeddings finished so far are in the cache" if self.cache.path is not None else ""
            raise RayClusterError(f"the Ray cluster failed the run ({type(e).__name__}: {first_line(e)}){kept}") \
                from e
        finally:
            if self._started:  # after Engine.rank's own finally has closed the stream
                try:
                    self.ray.shutdown()
                except Exception:
                    pass

    def _plan(self) -> ActorPlan:
        return ActorPlan(self.ray.cluster_resources(), self.actors, self.batch_size)


def _is_ray_error(e: BaseException) -> bool:
    """Errors from Ray itself (lost nodes, dead actors, lost connection) or raised on its workers."""
    mod = type(e).__module__ or ""
    return mod.startswith("ray") or isinstance(e, (ConnectionError, TimeoutError)) or "Ray" in type(e).__name__
