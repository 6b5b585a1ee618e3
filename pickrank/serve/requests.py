"""The reward server's requests: the limits on what one may ask, reading a body (in time, within the memory bodies
may hold at once) and parsing it (JSON with base64 images, a multipart form, or a safetensors body of uint8 pixels;
off the event loop) into a `ScoreRequest`; what is wrong is an `ApiError`."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

import numpy as np
from fastapi import Request

from pickrank.errors import InvalidText
from pickrank.inputs.decode import DEFAULT_MAX_PIXELS
from pickrank.inputs.textfile import check_text, loads_json
from pickrank.options import Scale

SAFETENSORS_TYPES = ("application/octet-stream", "application/x-safetensors")
RETRY_AFTER_S = 1  # what a 503 tells a client to wait before it tries again


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
    max_inflight_mb: float = 1024.0  # memory request bodies take at once (BODY_COPIES each); beyond: 503
    read_timeout_s: float = 60.0  # to send a request's headers, and again its body; beyond: 408
    max_connections: int = 512  # open connections; beyond: 503 and closed
    grace_s: float = 30.0  # after a stop signal, for requests in flight; then 503

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))

    @property
    def max_inflight_bytes(self) -> int:
        return int(self.max_inflight_mb * (1 << 20))


class ApiError(Exception):
    """A request the server answers with `status` and {"error": message} (and `headers`)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}
def unavailable(message: str) -> ApiError:
    """A 503 that tells the client when to try again."""
    return ApiError(503, message, {"Retry-After": str(RETRY_AFTER_S)})


class Body:
    """A request body, handed from reading to parsing once: the parser that takes it holds its only reference and
    drops it as soon as it has the parsed form, so that a body and its copies are never all alive at once."""

    def __init__(self, data: bytearray) -> None:
        self._data: bytearray | None = data

    def take(self) -> bytearray:
        data, self._data = self._data, None
        if data is None:
            raise RuntimeError("the request body was taken already")
        return data


@dataclass
class ScoreRequest:
    """A parsed request: one prompt per image, the images (encoded bytes or uint8 HWC arrays), the unit asked for."""

    prompts: list[str]
    images: list[bytes | np.ndarray]
    scale: Scale | None = None
def parse_scale(value: object, where: str = "scale") -> Scale | None:
    """A Scale from a request field (None: the server's default); anything else is a 400 naming the choices."""
    if value is None:
        return None
    try:
        return Scale(value)
    except ValueError:
        raise ApiError(400, f"{where}: unknown scale {value!r}: use " + ", ".join(s.value for s in Scale)) from None


def _text(value: str, where: str) -> str:
    """A prompt checked as every prompt is (`textfile.check_text`): what no tokenizer takes is this request's 400,
    before it can share a batch with another's."""
    try:
        return check_text(value, where)
    except InvalidText as e:
        raise ApiError(400, str(e)) from None


def pair_prompts(prompt: object, prompts: object, n: int, where: str) -> list[str]:
    """One prompt per image from `prompt` (one for all) or `prompts` (a list, one per image, or of one), each
    valid text."""
    if (prompt is None) == (prompts is None):
        raise ApiError(400, f"{where}: give either 'prompt' (one for every image) or 'prompts' (one per image)")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ApiError(400, f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
        return [_text(prompt, "prompt")] * n
    if not isinstance(prompts, list):
        raise ApiError(400, f"{where}: 'prompts' must be a list of strings, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ApiError(400, f"prompts[{i}]: must be a string, got {type(p).__name__}")
        _text(p, f"prompts[{i}]")
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


def parse_json(body: Body, limits: ServeLimits) -> ScoreRequest:
    """{"prompt": str | "prompts": [str], "images": [base64], "scale": str?}; the images decoded in place, each
    string dropped once decoded."""
    try:
        doc = loads_json(body.take())
    except ValueError as e:  # malformed, not UTF-8, or nested too deep
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
    for i, value in enumerate(images):
        images[i] = _b64(value, i)
    return ScoreRequest(prompts, images, scale)


_PARSE_CHUNK = 1 << 20  # bytes of a form parsed between two turns of the event loop


def _check_form_complete(content_type: str, body: bytes | bytearray) -> None:
    """A form must end with its closing boundary: a truncated one would lose its last parts without a word."""
    found = re.search(r'boundary="?([^";,\s]+)', content_type, re.IGNORECASE)
    if found is None:
        raise ApiError(400, "body: malformed multipart form: no boundary in its Content-Type")
    if body.rfind(b"--" + found.group(1).encode("latin-1") + b"--") < 0:
        raise ApiError(400, "body: the multipart form is truncated (it does not end with its closing boundary)")


async def parse_multipart(headers: Any, body: Body, limits: ServeLimits) -> ScoreRequest:
    """A form with `prompt` (once, or once per image), `image` file fields and an optional `scale`; parsed a chunk
    at a time, the event loop serving others in between."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    data = body.take()
    _check_form_complete(headers.get("content-type", ""), data)

    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, len(data), _PARSE_CHUNK):
            yield bytes(data[start:start + _PARSE_CHUNK])
            await asyncio.sleep(0)

    try:
        form = await MultiPartParser(headers, stream(), max_files=limits.max_images,
                                     max_fields=limits.max_images + 16).parse()
        data = b""  # the parts hold what is needed now: let the body go
    except MultiPartException as e:
        if e.message.startswith(("Too many files", "Too many fields")):
            raise ApiError(413, f"form: more than {limits.max_images} images in one request "
                                f"(--max-images): {e.message}") from None
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


def _safetensors_metadata(body: bytes | bytearray) -> dict[str, str]:
    """The __metadata__ of a safetensors body (its JSON header is read here; the tensors by safetensors)."""
    if len(body) < 8:
        raise ApiError(400, "body: not a safetensors file (shorter than its header)")
    n = int.from_bytes(body[:8], "little")
    if n > len(body) - 8:
        raise ApiError(400, "body: not a safetensors file (header length past the end)")
    try:
        header = loads_json(body[8:8 + n])
    except ValueError as e:
        raise ApiError(400, f"body: not a safetensors file (its header is not valid JSON: {e})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _image_keys(tensors: dict[str, np.ndarray]) -> list[str]:
    """`images`, or `images.0`, `images.1`, ... `images.{n-1}` in that order (canonical indices, none missing: two
    keys can never be read as one run); any other key is a 400 naming it."""
    if set(tensors) == {"images"}:
        return ["images"]
    keys = [f"images.{i}" for i in range(len(tensors))]
    for key in sorted(set(tensors) - set(keys)):
        head, _, tail = key.partition(".")
        if head == "images" and tail.isascii() and tail.isdigit():
            raise ApiError(400, f"body: tensor {key!r}: the runs must be 'images.0' to 'images.{len(keys) - 1}', "
                                "numbered without leading zeros or gaps")
        raise ApiError(400, f"body: unexpected tensor {key!r}: send uint8 'images' (N, H, W, 3), or "
                            "'images.0', 'images.1', ... for images of several sizes")
    return keys


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


def parse_safetensors(body: Body, limits: ServeLimits) -> ScoreRequest:
    """uint8 images in a safetensors body; the prompts and the scale in its metadata (never pickle)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    data = body.take()
    meta = _safetensors_metadata(data)
    data = bytes(data)  # what safetensors reads; the bytearray is dropped
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, TypeError) as e:
        raise ApiError(400, f"body: not a valid safetensors file: {e}") from None
    del data
    keys = _image_keys(tensors)
    images: list[bytes | np.ndarray] = []
    for key in keys:
        _check_array(key, tensors[key], limits, len(images))
        images.extend(tensors[key])
    _check_count(len(images), limits)
    prompts: object = None
    if "prompts" in meta:
        try:
            prompts = loads_json(meta["prompts"])
        except (ValueError, TypeError) as e:
            raise ApiError(400, f"metadata 'prompts': must be a JSON list of strings ({e})") from None
    prompts = pair_prompts(meta.get("prompt"), prompts, len(images), "metadata")
    return ScoreRequest(prompts, images, parse_scale(meta.get("scale"), "metadata 'scale'"))


BODY_COPIES = 2  # a body and what it is parsed into are alive at once: what a body reserves, in its sizes


class Bodies:
    """The request bodies being read or held: each read within `read_timeout_s` (408), the memory they take at once
    within `max_inflight_mb` (each reserving BODY_COPIES times its size; beyond: 503, Retry-After), and none waited
    for once the server stops (503)."""

    def __init__(self, limits: ServeLimits) -> None:
        self.limits = limits
        self.held = 0  # bytes reserved by the requests in flight (the event loop's alone: no lock)
        self.stopping = asyncio.Event()

    def _reserve(self, size: int, reserved: list[int]) -> None:
        """Reserve memory for a body of `size` bytes (`reserved[0]`: what it holds already); 503 past the limit."""
        more = BODY_COPIES * size - reserved[0]
        if more <= 0:
            return
        if self.held + more > self.limits.max_inflight_bytes:
            raise unavailable(f"the request bodies in flight hold {self.held:,} bytes; this one's {size:,} "
                              f"(x{BODY_COPIES} while parsed) would pass {self.limits.max_inflight_bytes:,} "
                              "(--max-inflight-mb)")
        self.held += more
        reserved[0] += more

    async def _read(self, request: Request, reserved: list[int]) -> bytearray:
        """The body, refused with 413 past max_body (by its Content-Length before reading); memory reserved as
        declared, then as it comes."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit():
            if int(declared) > limit:
                raise ApiError(413, f"body: {int(declared):,} bytes, limit {limit:,} (--max-body-mb)")
            self._reserve(int(declared), reserved)
        data = bytearray()  # grown a chunk at a time: no copy of the whole on the event loop
        async for chunk in request.stream():
            if len(data) + len(chunk) > limit:
                raise ApiError(413, f"body: more than {limit:,} bytes (--max-body-mb)")
            self._reserve(len(data) + len(chunk), reserved)
            data += chunk
        return data

    async def _arrived(self, request: Request, reserved: list[int]) -> Body:
        """The whole body; 408 when it does not arrive within read_timeout_s, 503 when the server stops first."""
        reading = asyncio.ensure_future(self._read(request, reserved))
        stopping = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({reading, stopping}, timeout=self.limits.read_timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():
                if stopping.done():
                    raise unavailable("the server is stopping: the request body did not arrive in time")
                raise ApiError(408, f"body: not received within {self.limits.read_timeout_s:g} s "
                                    "(--read-timeout-s)")
            return Body(reading.result())
        finally:
            reading.cancel()
            stopping.cancel()

    @asynccontextmanager
    async def read(self, request: Request) -> AsyncIterator[Body]:
        """The request's body, its memory counted as held until the block ends."""
        reserved = [0]
        try:
            yield await self._arrived(request, reserved)
        finally:
            self.held -= reserved[0]


def content_kind(request: Request) -> str:
    """The request's Content-Type, one the server takes; 415 otherwise."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("application/json", "multipart/form-data", *SAFETENSORS_TYPES):
        raise ApiError(415, f"Content-Type {kind or '(none)'!r}: send application/json, multipart/form-data or "
                            "application/x-safetensors")
    return kind


async def parse_body(kind: str, headers: Any, body: Body, limits: ServeLimits) -> ScoreRequest:
    """The body, by its Content-Type: JSON, a multipart form, or safetensors; JSON and safetensors are parsed in a
    thread, a form a chunk at a time, so that a large body stalls the event loop only while json.loads runs (one C
    call that holds the GIL)."""
    if kind == "application/json":
        return await asyncio.to_thread(parse_json, body, limits)
    if kind == "multipart/form-data":
        return await parse_multipart(headers, body, limits)
    return await asyncio.to_thread(parse_safetensors, body, limits)


__all__ = ["SAFETENSORS_TYPES", "RETRY_AFTER_S", "ServeLimits", "ApiError", "unavailable", "ScoreRequest",
           "Body", "parse_scale", "pair_prompts", "parse_json", "parse_multipart", "parse_safetensors", "BODY_COPIES",
           "Bodies", "content_kind", "parse_body"]
