"""The reward server's requests: the limits on what one may ask, and parsing its body (JSON with base64 images, a
multipart form, or a safetensors body of uint8 pixels) into a `ScoreRequest`; what is wrong is an `ApiError`."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator

import numpy as np
from fastapi import Request

from pickrank.inputs.decode import DEFAULT_MAX_PIXELS
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

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))


class ApiError(Exception):
    """A request the server answers with `status` and {"error": message} (and `headers`)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}
def unavailable(message: str) -> ApiError:
    """A 503 that tells the client when to try again."""
    return ApiError(503, message, {"Retry-After": str(RETRY_AFTER_S)})


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


__all__ = ["SAFETENSORS_TYPES", "RETRY_AFTER_S", "ServeLimits", "ApiError", "unavailable", "ScoreRequest",
           "parse_scale", "pair_prompts", "parse_json", "parse_multipart", "parse_safetensors", "read_body",
           "parse_request"]
