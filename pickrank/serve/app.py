"""`pickrank serve`: PickScore as an HTTP reward service, batched across callers (FastAPI; `pip install
'pickrank[serve]'`).

    POST /v1/score   {"prompt" | "prompts", "images": [base64 PNG/JPEG/WebP], "scale"?} (JSON), a multipart form
                     (prompt, image..., scale), or a safetensors body (uint8 `images` (N, H, W, 3), or runs of one
                     size as `images.0`, `images.1`, ...; metadata "prompt" or "prompts" (a JSON list), "scale")
                     -> {"scores": [...], "truncated": [...], "scale": ..., "model": "NAME@REVISION"}, in request
                     order; ?meta=1: "model" is the whole provenance (as on /v1/info)
    POST /v1/rank    the same body, one prompt -> {"ranking": [{"index", "score", "prob", "rank"}, best first], ...}
    GET  /healthz    {"status": "ok"} once the model has loaded, 503 (Retry-After) until then; nothing else
    GET  /v1/info    model, versions, limits, default scale;  GET /metrics (Prometheus)
    GET  /docs       the routes, a page with no outside resources;  /openapi.json (OpenAPI)

This module holds the app: its routes, errors, info and metrics. Requests are parsed in `serve.requests`;
decoding and batching are `serve.batching`'s, and nothing there decodes, preprocesses or scores on its own:
encoded images go through `workers.decode_many` in the CLI's worker pool, pixel arrays through
`decode.image_pixels`, the model through `core.backend.Batcher` and `core.engine.encode_paired`, the math through
`core.scores`. The event loop only parses and waits: decoding runs in the pool (or threads), the model in one
thread of its own. `serve.server` listens and runs the app.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import logging
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib import metadata as importlib_metadata
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

import numpy as np
from fastapi import FastAPI, Request, Response

from pickrank import __version__
from pickrank.inputs.imagestats import STAT_NAMES
from pickrank.options import Scale
from pickrank.serve.batching import Decoders, DynamicBatcher
from pickrank.serve.metrics import Metrics
from pickrank.serve.requests import ApiError, Bodies, ScoreRequest, ServeLimits, content_kind, parse_body, unavailable

if TYPE_CHECKING:
    from pickrank.models.protocol import ImageTextEmbedder

log = logging.getLogger("pickrank")


def _load_error(embedder: ImageTextEmbedder) -> BaseException | None:
    """Why the model failed to load (only asked once the load has ended); None when it is fine."""
    return embedder.error() if embedder.ready else None


def _version(package: str) -> str | None:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return None


def model_provenance(embedder: ImageTextEmbedder) -> dict:
    """What is known of the model while it loads, or once it failed (a loaded one has its full provenance)."""
    return {"model": embedder.source.model, "revision": embedder.revision,
            "status": "loading" if not embedder.ready else "failed"}


def cpu_threads(backend: str) -> int | None:
    """The threads torch runs a model call on in this process (None for another backend)."""
    if backend != "torch":
        return None
    import torch

    return torch.get_num_threads()


def short_model_id(prov: dict) -> str:
    """The model as score responses name it: NAME@REVISION (a hub commit's first 12 digits), or for a folder
    NAME@ the first 12 hex digits of its weights' SHA-256; the whole provenance is on /v1/info."""
    weights = prov.get("weights") or {}
    tag = (prov.get("revision") or "")[:12] or str(next(iter(weights.values()), ""))[:12]
    return f"{prov.get('model')}@{tag}" if tag else str(prov.get("model"))


def wants_meta(request: Request) -> bool:
    """?meta=1 (or true, yes): the response carries the whole provenance, not only the model's short id."""
    return request.query_params.get("meta", "").lower() in ("1", "true", "yes")


def server_info(model: dict, limits: ServeLimits, scale: Scale, ready: bool, threads: int | None = None) -> dict:
    """GET /v1/info: the model's provenance, versions, limits, the default scale and the CPU threads of a model
    call (the one place it is built)."""
    versions = {"pickrank": __version__, "python": sys.version.split()[0],
                **{p: _version(p) for p in ("torch", "transformers", "fastapi", "uvicorn")}}
    return {"model": model, "versions": versions, "limits": asdict(limits),
            "scale": scale.value, "scales": [s.value for s in Scale], "ready": ready, "cpu_threads": threads}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """Every error the server sends: JSON {"error": message}; the connection is closed after it (the request's body
    may be unread: the connection could not carry another request)."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers={**(headers or {}), "Connection": "close"})


class _Service:
    """One app's state: the embedder, limits, token, default scale, metrics; the batcher and decoders once the
    app has started."""

    def __init__(self, embedder: ImageTextEmbedder, limits: ServeLimits, token: str | None, scale: Scale,
                 make_batcher: Callable[..., Any]) -> None:
        self.embedder, self.limits, self.token, self.scale = embedder, limits, token, scale
        self.make_batcher = make_batcher
        self.metrics = Metrics(limits.max_batch, signals=limits.signals)
        self.batcher: DynamicBatcher | None = None
        self.decoders: Decoders | None = None
        self.queued = 0  # images accepted and not yet answered
        self.bodies = Bodies(limits)
        self.inflight: set[asyncio.Task] = set()  # the requests' work, cancelled when a stop's grace has passed
        self.expired = False  # a stop's grace period has passed
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

    async def model_for(self, request: Request, scale: Scale) -> dict | str:
        """What a score or rank response says of the model: its short id, or with ?meta=1 the provenance."""
        prov = await self.model_info(scale)
        return prov if wants_meta(request) else short_model_id(prov)

    def _provenance_when_loaded(self) -> None:
        """Wait for the load to end, then compute the provenance (a failure is the requests' to report)."""
        self.embedder.error()
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
            raise unavailable("the model is still loading")
        error = _load_error(self.embedder)
        if error is not None:
            raise ApiError(500, f"the model failed to load: {error}")

    def stop(self) -> None:
        """On the event loop, when the server stops: bodies still arriving get a 503 at once; requests received
        get `grace_s` to be answered, then a 503."""
        self.bodies.stopping.set()
        asyncio.get_running_loop().call_later(self.limits.grace_s, self._expire)

    def _expire(self) -> None:
        self.expired = True
        for task in list(self.inflight):
            task.cancel()

    async def _run(self, work: Callable[[], Awaitable[Any]]) -> Any:
        """work() as a task of its own, which a stop cancels once its grace period has passed: then a 503."""
        task = asyncio.ensure_future(work())
        self.inflight.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self.expired and task.cancelled() and not (current and current.cancelling()):
                raise unavailable(f"the server stopped before this request was answered (--grace-s "
                                  f"{self.limits.grace_s:g})") from None
            raise
        finally:
            self.inflight.discard(task)

    async def answer(self, endpoint: str, request: Request, work: Callable[[], Awaitable[Any]],
                     auth: bool = True) -> Response:
        """Run one endpoint: authorise, time and count it; every failure becomes {"error": ...} with its status."""
        from fastapi.responses import JSONResponse

        started = time.perf_counter()
        try:
            if auth:
                self.authorize(request)
            result = await self._run(work)
            response = result if hasattr(result, "status_code") else JSONResponse(result)
        except ApiError as e:
            response = error_response(e.status, e.message, e.headers)
        except Exception as e:  # a bug or a model failure must not take the server down
            log.error("%s failed: %s: %s", endpoint, type(e).__name__, e)
            response = error_response(500, f"internal error: {type(e).__name__}: {e}")
        self.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    async def raw_scores(self, request: Request) -> tuple[ScoreRequest, np.ndarray, list[bool], list[dict] | None]:
        """Read (its bytes held until answered), parse, admit (queue limit), decode and score one request: raw
        scores in request order (and with --signals each image's statistics)."""
        self.check_ready()
        kind = content_kind(request)
        async with self.bodies.read(request) as body:
            parsed = await parse_body(kind, request.headers, body, self.limits)
            return parsed, *await self._queued(parsed)

    async def _queued(self, parsed: ScoreRequest) -> tuple[np.ndarray, list[bool], list[dict] | None]:
        """Admit a parsed request to the queue, decode and score its images (with --signals: and their image
        statistics, also into /metrics)."""
        n = len(parsed.images)
        if n > self.limits.max_queue:
            raise ApiError(413, f"images: {n} images in one request, more than the queue holds "
                                f"({self.limits.max_queue}, --max-queue)")
        if self.queued + n > self.limits.max_queue:
            raise unavailable(f"the queue is full ({self.queued} images waiting, limit {self.limits.max_queue})")
        self.queued += n
        self.metrics.queue.set(self.queued)
        try:
            decoded = await self.decoders.decode(parsed.images, self.embedder.spec,  # type: ignore[union-attr]
                                                 self.limits.max_pixels, self.limits.signals)
            scores, truncated = await self.batcher.score([d.pixels for d in decoded],  # type: ignore[union-attr]
                                                         parsed.prompts)
        finally:
            self.queued -= n
            self.metrics.queue.set(self.queued)
        self.metrics.images.inc(n)
        if not self.limits.signals:
            return scores, truncated, None
        for d in decoded:
            self.metrics.observe_stats(d.stats)  # type: ignore[arg-type]
        return scores, truncated, [dict(zip(STAT_NAMES, d.stats.values())) for d in decoded]  # type: ignore[union-attr]

    def in_scale(self, raw: np.ndarray, scale: Scale) -> list[float]:
        return [scale.convert(float(r), self.embedder.scale) for r in raw]

    async def score(self, request: Request) -> dict:
        parsed, raw, truncated, stats = await self.raw_scores(request)
        scale = parsed.scale or self.scale
        signals = {} if stats is None else {"signals": stats}  # serve --signals: per image, in request order
        return {"scores": self.in_scale(raw, scale), "truncated": truncated, "scale": scale.value, **signals,
                "model": await self.model_for(request, scale)}

    async def rank(self, request: Request) -> dict:
        from pickrank.core.scores import as_array, ranks, softmax_probs

        parsed, raw, truncated, _ = await self.raw_scores(request)
        if len(set(parsed.prompts)) > 1:
            raise ApiError(400, "prompts: a ranking is over one prompt: give 'prompt' (or equal prompts)")
        scale = parsed.scale or self.scale
        scores = self.in_scale(raw, scale)
        probs = softmax_probs(as_array(raw, self.embedder.backend)).tolist()  # as the CLI's, on either backend
        rk = ranks(raw.tolist())
        order = sorted(range(len(scores)), key=lambda i: rk[i])
        return {"prompt": parsed.prompts[0], "truncated": truncated[0], "scale": scale.value,
                "ranking": [{"index": i, "score": scores[i], "prob": probs[i], "rank": rk[i]} for i in order],
                "model": await self.model_for(request, scale)}

    async def health(self) -> Any:
        """Whether the model is ready, and nothing more: /healthz needs no token."""
        self.check_ready()
        return {"status": "ok"}

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


_DOCS_CSP = "default-src 'none'; style-src 'unsafe-inline'"


def docs_page(openapi: dict) -> str:
    """GET /docs: the routes and their summaries, linking to /openapi.json; no script and nothing from another
    host, so that it shows offline (an OpenAPI viewer can open the JSON)."""
    rows = "".join(f"<tr><td>{html.escape(method.upper())}</td><td><code>{html.escape(path)}</code></td>"
                   f"<td>{html.escape(str(op.get('summary', '')))}</td></tr>"
                   for path, ops in openapi.get("paths", {}).items() for method, op in ops.items())
    info = openapi.get("info", {})
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(str(info.get('title')))}"
            "</title><style>body{font-family:sans-serif;margin:2em}td{padding:.2em 1em .2em 0}</style></head>"
            f"<body><h1>{html.escape(str(info.get('title')))} {html.escape(str(info.get('version')))}</h1>"
            f"<p>{html.escape(str(info.get('description', '')))}</p><table>{rows}</table>"
            "<p>The whole API, with its request bodies: <a href=\"/openapi.json\">/openapi.json</a> (OpenAPI 3; "
            "open it in any OpenAPI viewer).</p></body></html>")


def create_app(embedder: ImageTextEmbedder, limits: ServeLimits | None = None, token: str | None = None,
               scale: Scale | str = Scale.raw, make_batcher: Callable[..., Any] = DynamicBatcher) -> FastAPI:
    """The reward server's FastAPI app over an embedder (loaded, or a `loading.LoadingEmbedder` still loading:
    /healthz answers 503 until it is ready). `make_batcher(embedder, limits, metrics)` gathers images into model
    calls (`score(pixels, prompts)`, `run()`, `close()`): DynamicBatcher here, `serve_ray.RayBatcher` on Ray."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    svc = _Service(embedder, limits or ServeLimits(), token, Scale(scale), make_batcher)
    app = FastAPI(title="pickrank reward server", version=__version__, lifespan=svc.lifespan, docs_url=None,
                  redoc_url=None,
                  description="PickScore rewards, batched across callers. Errors are JSON {\"error\": ...}.")
    app.state.service = svc

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception) -> Response:  # outside a route's own handling: JSON too
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(e).__name__, e)
        return error_response(500, f"internal error: {type(e).__name__}")

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

    @app.get("/v1/info", summary="Model, versions, limits, the default scale, CPU threads of a model call")
    async def info(request: Request) -> Response:
        async def work() -> dict:
            threads = cpu_threads(embedder.backend) if embedder.ready else None
            return server_info(await svc.model_info(), svc.limits, svc.scale, embedder.ready, threads)

        return await svc.answer("info", request, work)

    @app.get("/docs", summary="This page: the routes, and a link to /openapi.json", include_in_schema=False)
    async def docs() -> Response:
        from fastapi.responses import HTMLResponse

        return HTMLResponse(docs_page(app.openapi()), headers={"Content-Security-Policy": _DOCS_CSP})

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics(request: Request) -> Response:
        return await svc.answer("metrics", request, svc.metrics_text)

    return app


__all__ = ["model_provenance", "cpu_threads", "short_model_id", "wants_meta", "server_info", "error_response",
           "docs_page", "create_app"]
