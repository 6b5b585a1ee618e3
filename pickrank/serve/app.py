"""`pickrank serve`: PickScore as an HTTP reward service, batched across callers (FastAPI; `pip install
'pickrank[serve]'`).

    POST /v1/score   {"prompt" | "prompts", "images": [base64 PNG/JPEG/WebP], "scale"?} (JSON), a multipart form
                     (prompt, image..., scale), or a safetensors body (uint8 `images` (N, H, W, 3), or runs of one
                     size as `images.0`, `images.1`, ...; metadata "prompt" or "prompts" (a JSON list), "scale")
                     -> {"scores": [...], "truncated": [...], "scale": ..., "model": {...}}, in request order
    POST /v1/rank    the same body, one prompt -> {"ranking": [{"index", "score", "prob", "rank"}, best first], ...}
    GET  /healthz    200 once the model has loaded, 503 (Retry-After) until then
    GET  /v1/info    model, versions, limits, default scale;  GET /metrics (Prometheus);  /docs (OpenAPI)

Nothing here decodes, preprocesses or scores on its own: encoded images go through `reader.decode_many` in the
CLI's worker pool, pixel arrays through `reader.image_pixels`, the model through `pipeline.Batcher` and
`pipeline.encode_paired`, the math through `score.py`. The event loop only parses and waits: decoding runs in
the pool (or threads), the model in one thread of its own.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import hmac
import json
import logging
import sys
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Iterator

import numpy as np
from fastapi import FastAPI, Request, Response

from pickrank import __version__
from pickrank.inputs.reader import DEFAULT_MAX_PIXELS, Decoded, ImageSpec, close_pool, decode_many, worker_pool
from pickrank.options import Scale

if TYPE_CHECKING:
    from pickrank.models.protocol import ImageTextEmbedder

log = logging.getLogger("pickrank")

SAFETENSORS_TYPES = ("application/octet-stream", "application/x-safetensors")
RETRY_AFTER_S = 1  # what a 503 tells a client to wait before it tries again
_DECODE_CHUNK = 4  # encoded images per round trip to a decode worker
_TOO_LARGE = "too large"  # how reader's pixel-limit reason starts: answered 413, not 422


@dataclass(frozen=True)
class ServeLimits:
    """The server's batching and the limits on what one request may ask (all on by default)."""

    max_batch: int = 64  # images per model call
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for others
    max_queue: int = 2048  # images accepted and not yet answered; beyond: 503
    max_body_mb: float = 256.0  # request body size; beyond: 413
    max_images: int = 1024  # images in one request; beyond: 413
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # pixels of one image; beyond: 413
    workers: int = 0  # decode processes (0: decode in threads of this process)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))


class ApiError(Exception):
    """A request the server answers with `status` and {"error": message} (and `headers`)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _unavailable(message: str) -> ApiError:
    return ApiError(503, message, {"Retry-After": str(RETRY_AFTER_S)})


@dataclass
class ScoreRequest:
    """A parsed request: one prompt per image, the images (encoded bytes or uint8 HWC arrays), the unit asked for."""

    prompts: list[str]
    images: list[bytes | np.ndarray]
    scale: Scale | None = None


# -- parsing ---------------------------------------------------------------------------------------------------

def parse_scale(value: object, where: str = "scale") -> Scale | None:
    """A Scale from a request field (None: the server's default); anything else is a 400 naming the choices."""
    if value is None:
        return None
    try:
        return Scale(value)
    except ValueError:
        raise ApiError(400, f"{where}: unknown scale {value!r}: use " + ", ".join(s.value for s in Scale)) from None


def pair_prompts(prompt: object, prompts: object, n: int, where: str) -> list[str]:
    """One prompt per image from `prompt` (one for all) or `prompts` (a list, one per image, or of one)."""
    if (prompt is None) == (prompts is None):
        raise ApiError(400, f"{where}: give either 'prompt' (one for every image) or 'prompts' (one per image)")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ApiError(400, f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
        return [prompt] * n
    if not isinstance(prompts, list):
        raise ApiError(400, f"{where}: 'prompts' must be a list of strings, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ApiError(400, f"prompts[{i}]: must be a string, got {type(p).__name__}")
    if len(prompts) == 1:
        return prompts * n
    if len(prompts) != n:
        raise ApiError(400, f"prompts: {len(prompts)} prompts for {n} images: give one, or one per image")
    return list(prompts)


def _check_count(n: int, limits: ServeLimits) -> None:
    if n == 0:
        raise ApiError(400, "images: no images in the request")
    if n > limits.max_images:
        raise ApiError(413, f"images: {n} images in one request, limit {limits.max_images} (--max-images)")


def _b64(value: object, i: int) -> bytes:
    """An image given as base64 (optionally a data: URL) -> its bytes."""
    if not isinstance(value, str):
        raise ApiError(400, f"images[{i}]: must be a base64 string, got {type(value).__name__}")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"images[{i}]: not valid base64") from None


def parse_json(body: bytes, limits: ServeLimits) -> ScoreRequest:
    """{"prompt": str | "prompts": [str], "images": [base64], "scale": str?}."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"body: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "body: must be a JSON object with 'images' and 'prompt' or 'prompts'")
    unknown = set(doc) - {"prompt", "prompts", "images", "scale"}
    if unknown:
        raise ApiError(400, f"body: unknown field(s) {', '.join(sorted(map(repr, unknown)))}")
    images = doc.get("images")
    if not isinstance(images, list):
        raise ApiError(400, "images: must be a list of base64-encoded images")
    _check_count(len(images), limits)
    scale = parse_scale(doc.get("scale"))
    prompts = pair_prompts(doc.get("prompt"), doc.get("prompts"), len(images), "body")
    return ScoreRequest(prompts, [_b64(v, i) for i, v in enumerate(images)], scale)


async def parse_multipart(headers: Any, body: bytes, limits: ServeLimits) -> ScoreRequest:
    """A form with `prompt` (once, or once per image), `image` file fields and an optional `scale`."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(headers, stream(), max_files=limits.max_images + 1,
                                     max_fields=limits.max_images + 16).parse()
    except MultiPartException as e:
        raise ApiError(400, f"body: malformed multipart form: {e.message}") from None
    unknown = set(form.keys()) - {"prompt", "image", "scale"}
    if unknown:
        raise ApiError(400, f"form: unknown field(s) {', '.join(sorted(map(repr, unknown)))}")
    files = form.getlist("image")
    _check_count(len(files), limits)
    images = []
    for i, f in enumerate(files):
        if isinstance(f, str):
            raise ApiError(400, f"image[{i}]: must be a file upload (-F image=@file.png)")
        images.append(await f.read())
    prompts = form.getlist("prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ApiError(400, f"prompt[{i}]: must be a text field")
    return ScoreRequest(pair_prompts(None, prompts or None, len(images), "form"), images,
                        parse_scale(form.get("scale")))


def _safetensors_metadata(body: bytes) -> dict[str, str]:
    """The __metadata__ of a safetensors body (its JSON header is read here; the tensors by safetensors)."""
    if len(body) < 8:
        raise ApiError(400, "body: not a safetensors file (shorter than its header)")
    n = int.from_bytes(body[:8], "little")
    if n > len(body) - 8:
        raise ApiError(400, "body: not a safetensors file (header length past the end)")
    try:
        header = json.loads(body[8:8 + n])
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "body: not a safetensors file (header is not JSON)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _image_keys(tensors: dict[str, np.ndarray]) -> list[str]:
    """`images`, or `images.0`, `images.1`, ... in that order; any other key is a 400."""
    if set(tensors) == {"images"}:
        return ["images"]
    order = {}
    for key in tensors:
        head, _, tail = key.partition(".")
        if head != "images" or not tail.isdigit():
            raise ApiError(400, f"body: unexpected tensor {key!r}: send uint8 'images' (N, H, W, 3), or "
                                "'images.0', 'images.1', ... for images of several sizes")
        order[int(tail)] = key
    return [order[i] for i in sorted(order)]


def _check_array(key: str, arr: np.ndarray, limits: ServeLimits, first: int) -> None:
    """A tensor of images must be uint8 (N, H, W, 3 or 4), each within max_pixels."""
    if arr.dtype != np.uint8:
        raise ApiError(400, f"{key}: must be uint8, got {arr.dtype}; quantise floats in [0, 1] as "
                            "(x * 255).round().clip(0, 255)")
    if arr.ndim != 4 or arr.shape[3] not in (3, 4) or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ApiError(400, f"{key}: must be shaped (N, H, W, 3) or (N, H, W, 4), got {tuple(arr.shape)}")
    h, w = arr.shape[1:3]
    if limits.max_pixels and h * w > limits.max_pixels:
        raise ApiError(413, f"images[{first}]: {w}x{h} = {w * h:,} pixels, limit {limits.max_pixels:,} "
                            "(--max-pixels)")


def parse_safetensors(body: bytes, limits: ServeLimits) -> ScoreRequest:
    """uint8 images in a safetensors body; the prompts and the scale in its metadata (never pickle)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    meta = _safetensors_metadata(body)
    try:
        tensors = load(body)
    except (SafetensorError, ValueError, TypeError) as e:
        raise ApiError(400, f"body: not a valid safetensors file: {e}") from None
    keys = _image_keys(tensors)
    images: list[bytes | np.ndarray] = []
    for key in keys:
        _check_array(key, tensors[key], limits, len(images))
        images.extend(tensors[key])
    _check_count(len(images), limits)
    prompts: object = None
    if "prompts" in meta:
        try:
            prompts = json.loads(meta["prompts"])
        except ValueError:
            raise ApiError(400, "metadata 'prompts': must be a JSON list of strings") from None
    prompts = pair_prompts(meta.get("prompt"), prompts, len(images), "metadata")
    return ScoreRequest(prompts, images, parse_scale(meta.get("scale"), "metadata 'scale'"))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it passes `limit` bytes (by its Content-Length, before reading)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body: {int(declared):,} bytes, limit {limit:,} (--max-body-mb)")
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"body: more than {limit:,} bytes (--max-body-mb)")
        parts.append(chunk)
    return b"".join(parts)


async def parse_request(request: Request, limits: ServeLimits) -> ScoreRequest:
    """The body, by its Content-Type: JSON, a multipart form, or safetensors."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("application/json", "multipart/form-data", *SAFETENSORS_TYPES):
        raise ApiError(415, f"Content-Type {kind or '(none)'!r}: send application/json, multipart/form-data or "
                            "application/x-safetensors")
    body = await read_body(request, limits.max_body_bytes)
    if kind == "application/json":
        return parse_json(body, limits)
    if kind == "multipart/form-data":
        return await parse_multipart(request.headers, body, limits)
    return parse_safetensors(body, limits)


# -- decoding (off the event loop) ----------------------------------------------------------------------------

class Decoders:
    """Decoding and preprocessing off the event loop: encoded images in the CLI's worker pool (`reader.decode_many`,
    the same limits), pixel arrays in threads (`reader.image_pixels`, Pillow releases the GIL while it resizes)."""

    def __init__(self, workers: int) -> None:
        self.pool = worker_pool(workers) if workers > 0 else None
        self.threads = ThreadPoolExecutor(max(2, workers), thread_name_prefix="pickrank-decode")

    async def pixels(self, images: list[bytes | np.ndarray], spec: ImageSpec,
                     max_pixels: int | None) -> list[np.ndarray]:
        """Preprocessed uint8 (3, H, W) pixels per image, in order; a 422 (413 over max_pixels) naming the failed."""
        from pickrank.inputs.reader import image_pixels

        loop = asyncio.get_running_loop()
        encoded = [(str(i), im) for i, im in enumerate(images) if isinstance(im, bytes)]
        chunks = [encoded[i:i + _DECODE_CHUNK] for i in range(0, len(encoded), _DECODE_CHUNK)]
        pool: Executor = self.pool or self.threads
        futures = [asyncio.wrap_future(pool.submit(decode_many, c, spec, max_pixels)) for c in chunks]
        arrays = {i: loop.run_in_executor(self.threads, image_pixels, im, spec, None)
                  for i, im in enumerate(images) if not isinstance(im, bytes)}
        results: dict[int, Decoded | str] = {}
        for chunk, out in zip(chunks, await asyncio.gather(*futures)):
            results.update((int(k), r) for (k, _), r in zip(chunk, out))
        for i, px in zip(arrays, await asyncio.gather(*arrays.values())):
            results[i] = Decoded(str(i), px)
        failed = [(i, r) for i, r in sorted(results.items()) if isinstance(r, str)]
        if failed:
            status = 413 if any(r.startswith(_TOO_LARGE) for _, r in failed) else 422
            raise ApiError(status, "; ".join(f"images[{i}]: {r}" for i, r in failed[:8]))
        return [results[i].pixels for i in range(len(images))]  # type: ignore[union-attr]

    def close(self) -> None:
        if self.pool is not None:
            close_pool(self.pool)
        self.threads.shutdown(wait=False, cancel_futures=True)


# -- dynamic batching -----------------------------------------------------------------------------------------

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
    return np.asarray(paired_scores(text, images, embedder.scale), dtype=np.float32), truncated


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


# -- metrics and info -----------------------------------------------------------------------------------------

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


def _load_error(embedder: ImageTextEmbedder) -> BaseException | None:
    """Why the model failed to load (only asked once the load has ended); None when it is fine."""
    error = getattr(embedder, "error", None)
    return error() if embedder.ready and error is not None else None


def _version(package: str) -> str | None:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return None


def model_provenance(embedder: ImageTextEmbedder) -> dict:
    """What is known of the model while it loads, or once it failed (a loaded one has its full provenance)."""
    source = getattr(embedder, "source", None)
    return {"model": getattr(source, "model", None), "revision": getattr(embedder, "revision", None),
            "status": "loading" if not embedder.ready else "failed"}


def server_info(model: dict, limits: ServeLimits, scale: Scale, ready: bool) -> dict:
    """GET /v1/info: the model's provenance, versions, limits and the default scale (the one place it is built)."""
    versions = {"pickrank": __version__, "python": sys.version.split()[0],
                **{p: _version(p) for p in ("torch", "transformers", "fastapi", "uvicorn")}}
    return {"model": model, "versions": versions, "limits": asdict(limits),
            "scale": scale.value, "scales": [s.value for s in Scale], "ready": ready}


# -- the app --------------------------------------------------------------------------------------------------

def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """Every error the server sends: JSON {"error": message}."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _Service:
    """One app's state: the embedder, limits, token, default scale, metrics; the batcher and decoders once the
    app has started."""

    def __init__(self, embedder: ImageTextEmbedder, limits: ServeLimits, token: str | None, scale: Scale,
                 make_batcher: Callable[..., Any]) -> None:
        self.embedder, self.limits, self.token, self.scale = embedder, limits, token, scale
        self.make_batcher = make_batcher
        self.metrics = Metrics(limits.max_batch)
        self.batcher: DynamicBatcher | None = None
        self.decoders: Decoders | None = None
        self.queued = 0  # images accepted and not yet answered
        self._provenance: dict | None = None
        self._provenance_lock = threading.Lock()

    def provenance(self) -> dict:
        """The run's provenance (`pickrank.core.provenance`), computed once after the load (weight hashes are remembered
        beside the cache); while the model loads, or when it failed, what is known of it. Blocks: call in a thread."""
        if not self.embedder.ready or _load_error(self.embedder) is not None:
            return model_provenance(self.embedder)
        with self._provenance_lock:
            if self._provenance is None:
                from pickrank.core import provenance

                self._provenance = provenance.compute(self.embedder, self.scale).as_dict()
        return self._provenance

    async def model_info(self, scale: Scale | None = None) -> dict:
        """The provenance for a response, with the unit its scores are in (a request may ask for another)."""
        prov = await asyncio.to_thread(self.provenance)
        return {**prov, "scale": (scale or self.scale).value} if "scale" in prov else prov

    def _provenance_when_loaded(self) -> None:
        """Wait for the load to end, then compute the provenance (a failure is the requests' to report)."""
        getattr(self.embedder, "error", lambda: None)()
        try:
            self.provenance()
        except Exception as e:  # noqa: BLE001 - a thread's failure must not go unseen, nor stop the server
            log.warning("provenance: %s: %s", type(e).__name__, e)

    def authorize(self, request: Request) -> None:
        """401 unless the request carries the bearer token (compared in constant time), when one is set."""
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "missing bearer token: send 'Authorization: Bearer TOKEN'",
                           {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise ApiError(401, "wrong token", {"WWW-Authenticate": "Bearer"})

    def check_ready(self) -> None:
        """503 while the model loads; 500 when it failed to load."""
        if not self.embedder.ready:
            raise _unavailable("the model is still loading")
        error = _load_error(self.embedder)
        if error is not None:
            raise ApiError(500, f"the model failed to load: {error}")

    async def answer(self, endpoint: str, request: Request, work: Callable[[], Awaitable[Any]],
                     auth: bool = True) -> Response:
        """Run one endpoint: authorise, time and count it; every failure becomes {"error": ...} with its status."""
        from fastapi.responses import JSONResponse

        started = time.perf_counter()
        try:
            if auth:
                self.authorize(request)
            result = await work()
            response = result if hasattr(result, "status_code") else JSONResponse(result)
        except ApiError as e:
            response = error_response(e.status, e.message, e.headers)
        except Exception as e:  # a bug or a model failure must not take the server down
            log.error("%s failed: %s: %s", endpoint, type(e).__name__, e)
            response = error_response(500, f"internal error: {type(e).__name__}: {e}")
        self.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    async def raw_scores(self, request: Request) -> tuple[ScoreRequest, np.ndarray, list[bool]]:
        """Parse, admit (queue limit), decode and score one request: raw scores in request order."""
        self.check_ready()
        parsed = await parse_request(request, self.limits)
        n = len(parsed.images)
        if self.queued + n > self.limits.max_queue:
            raise _unavailable(f"the queue is full ({self.queued} images waiting, limit {self.limits.max_queue})")
        self.queued += n
        self.metrics.queue.set(self.queued)
        try:
            pixels = await self.decoders.pixels(parsed.images, self.embedder.spec,  # type: ignore[union-attr]
                                                self.limits.max_pixels)
            scores, truncated = await self.batcher.score(pixels, parsed.prompts)  # type: ignore[union-attr]
        finally:
            self.queued -= n
            self.metrics.queue.set(self.queued)
        self.metrics.images.inc(n)
        return parsed, scores, truncated

    def in_scale(self, raw: np.ndarray, scale: Scale) -> list[float]:
        return [scale.convert(float(r), self.embedder.scale) for r in raw]

    async def score(self, request: Request) -> dict:
        parsed, raw, truncated = await self.raw_scores(request)
        scale = parsed.scale or self.scale
        return {"scores": self.in_scale(raw, scale), "truncated": truncated, "scale": scale.value,
                "model": await self.model_info(scale)}

    async def rank(self, request: Request) -> dict:
        from pickrank.core.scores import as_array, ranks, softmax_probs

        parsed, raw, truncated = await self.raw_scores(request)
        if len(set(parsed.prompts)) > 1:
            raise ApiError(400, "prompts: a ranking is over one prompt: give 'prompt' (or equal prompts)")
        scale = parsed.scale or self.scale
        scores = self.in_scale(raw, scale)
        probs = softmax_probs(as_array(raw, self.embedder.backend)).tolist()  # as the CLI's, on either backend
        rk = ranks(raw.tolist())
        order = sorted(range(len(scores)), key=lambda i: rk[i])
        return {"prompt": parsed.prompts[0], "truncated": truncated[0], "scale": scale.value,
                "ranking": [{"index": i, "score": scores[i], "prob": probs[i], "rank": rk[i]} for i in order],
                "model": await self.model_info(scale)}

    async def health(self) -> Any:
        self.check_ready()
        return {"status": "ok", "model": await self.model_info()}

    async def metrics_text(self) -> Response:
        from fastapi.responses import Response as Plain
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Plain(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """Start the decoders and the batching task with the app; stop them after the last request."""
        self.decoders = Decoders(self.limits.workers)
        self.batcher = self.make_batcher(self.embedder, self.limits, self.metrics)
        task = asyncio.create_task(self.batcher.run(), name="pickrank-batcher")
        # hash the weights as soon as the model has loaded, not on the first request
        threading.Thread(target=self._provenance_when_loaded, name="pickrank-provenance", daemon=True).start()
        try:
            yield
        finally:
            task.cancel()
            self.batcher.close()
            self.decoders.close()


_BODY_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "properties": {
        "prompt": {"type": "string"}, "prompts": {"type": "array", "items": {"type": "string"}},
        "images": {"type": "array", "items": {"type": "string", "format": "byte"}},
        "scale": {"type": "string", "enum": [s.value for s in Scale]}}, "required": ["images"]}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "prompt": {"type": "string"}, "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "scale": {"type": "string"}}}},
    "application/x-safetensors": {"schema": {"type": "string", "format": "binary", "description":
        "uint8 'images' (N, H, W, 3) or 'images.0', 'images.1', ...; metadata 'prompt' or 'prompts' (JSON list), "
        "'scale'"}}}}}


def create_app(embedder: ImageTextEmbedder, limits: ServeLimits | None = None, token: str | None = None,
               scale: Scale | str = Scale.raw, make_batcher: Callable[..., Any] = DynamicBatcher) -> FastAPI:
    """The reward server's FastAPI app over an embedder (loaded, or a `loading.LoadingEmbedder` still loading:
    /healthz answers 503 until it is ready). `make_batcher(embedder, limits, metrics)` gathers images into model
    calls (`score(pixels, prompts)`, `run()`, `close()`): DynamicBatcher here, `serve_ray.RayBatcher` on Ray."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    svc = _Service(embedder, limits or ServeLimits(), token, Scale(scale), make_batcher)
    app = FastAPI(title="pickrank reward server", version=__version__, lifespan=svc.lifespan,
                  description="PickScore rewards, batched across callers. Errors are JSON {\"error\": ...}.")
    app.state.service = svc

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> Response:  # 404, 405: JSON as well
        return error_response(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> Response:
        return error_response(400, f"invalid request: {e.errors()}")

    @app.post("/v1/score", openapi_extra=_BODY_DOC, summary="Scores of images against prompts, in request order")
    async def score(request: Request) -> Response:
        return await svc.answer("score", request, lambda: svc.score(request))

    @app.post("/v1/rank", openapi_extra=_BODY_DOC, summary="The images ranked for one prompt, with prob")
    async def rank(request: Request) -> Response:
        return await svc.answer("rank", request, lambda: svc.rank(request))

    @app.get("/healthz", summary="200 once the model has loaded, 503 until then")
    async def healthz(request: Request) -> Response:
        return await svc.answer("healthz", request, svc.health, auth=False)

    @app.get("/v1/info", summary="Model, versions, limits and the default scale")
    async def info(request: Request) -> Response:
        async def work() -> dict:
            return server_info(await svc.model_info(), svc.limits, svc.scale, embedder.ready)

        return await svc.answer("info", request, work)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics(request: Request) -> Response:
        return await svc.answer("metrics", request, svc.metrics_text)

    return app


# -- running it -----------------------------------------------------------------------------------------------

def bind(host: str, port: int) -> Any:
    """A listening TCP socket on host:port (port 0: a free one), for uvicorn to serve on."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        from pickrank.errors import UsageError

        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    return sock


def url_of(sock: Any) -> str:
    """http://host:port of a bound socket (IPv6 hosts in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def graceful_server(app: FastAPI) -> Any:
    """A uvicorn server whose SIGTERM, SIGINT and SIGHUP stop it gracefully (no new connections, requests in flight
    answered), and which does not raise the signal again once it has stopped: a stopped server exits 0."""
    import signal
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            names = ("SIGINT", "SIGTERM", "SIGHUP")
            saved = {s: signal.signal(s, self.handle_exit) for s in (getattr(signal, n, None) for n in names) if s}
            try:
                yield
            finally:
                for sig, handler in saved.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="on",
                            timeout_keep_alive=30)
    return Server(config)


def stop_if_load_fails(embedder: ImageTextEmbedder, server: Any, failed: list[BaseException]) -> None:
    """In a thread: once the model's load has ended, stop the server (noting why in `failed`) if it failed."""
    import threading

    def watch() -> None:
        error = getattr(embedder, "error", lambda: None)()
        if error is not None:
            failed.append(error)
            server.should_exit = True

    threading.Thread(target=watch, name="pickrank-load-watch", daemon=True).start()
