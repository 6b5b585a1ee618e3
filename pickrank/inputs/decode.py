"""Decode and preprocess images exactly as the CLIP image processor does: the first frame, its declared size checked
against --max-pixels before any pixel is decoded, `--decode fast` for JPEGs, then resize, crop and normalise (no torch
here: runs in workers)."""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import asdict, dataclass
from typing import IO

import numpy as np
from PIL import Image, ImageFile

from pickrank.errors import InputFailed, UsageError
from pickrank.inputs.files import ReadError, TooLarge, read_bytes

# Pillow's own default limit on decoded pixels (about 89.5 megapixels); --max-pixels changes it.
DEFAULT_MAX_PIXELS = 89_478_485
# Pillow's resample filters by number (`ImageSpec.resample`, preprocessor_config.json's "resample"), in words.
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

# Truncated files must fail, not be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class ImageSpec:
    """The preprocessing config: what the CLIP image processor does, read from preprocessor_config.json."""

    shortest_edge: int | None = 224
    resize_hw: tuple[int, int] | None = None
    crop_hw: tuple[int, int] | None = (224, 224)
    resample: int = 3
    rescale_factor: float | None = 1 / 255
    image_mean: tuple[float, ...] | None = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] | None = (0.26862954, 0.26130258, 0.27577711)
    convert_rgb: bool = True
    alpha: str = "white"  # transparency: "white" composites onto white (transformers 5), "drop" discards it (4.x)
    decode: str = "exact"  # JPEGs: "exact" (the reference), or "fast": decoded at reduced DCT scale first

    @classmethod
    def from_config(cls, cfg: dict) -> "ImageSpec":
        """Build the spec from a preprocessor_config.json dict (old `size: 224` and new dict forms)."""

        def hw(v: object) -> tuple[int, int] | None:
            if isinstance(v, int):
                return (v, v)
            if isinstance(v, dict) and "height" in v and "width" in v:
                return (int(v["height"]), int(v["width"]))
            return None

        size = cfg.get("size", 224)
        shortest = None
        resize_hw = None
        if cfg.get("do_resize", True):
            if isinstance(size, int):
                shortest = size
            elif isinstance(size, dict) and "shortest_edge" in size:
                shortest = int(size["shortest_edge"])
            else:
                resize_hw = hw(size)
                if resize_hw is None:
                    raise ValueError(f"unsupported preprocessor size: {size!r}")
        crop = hw(cfg.get("crop_size", 224)) if cfg.get("do_center_crop", True) else None
        rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else None
        normalize = cfg.get("do_normalize", True)
        mean = tuple(cfg.get("image_mean", cls.image_mean)) if normalize else None
        std = tuple(cfg.get("image_std", cls.image_std)) if normalize else None
        return cls(shortest_edge=shortest, resize_hw=resize_hw, crop_hw=crop, resample=int(cfg.get("resample", 3)),
                   rescale_factor=rescale, image_mean=mean, image_std=std,
                   convert_rgb=bool(cfg.get("do_convert_rgb", True)))

    def fingerprint(self) -> str:
        """A stable string naming this preprocessing, for cache keys (alpha "white" and decode "exact" are left out:
        the fingerprint of the preprocessing before those options existed, so that existing cache entries stay
        valid; a fast decode has its own)."""
        d = asdict(self)
        for name, default in (("alpha", "white"), ("decode", "exact")):
            if d[name] == default:
                del d[name]
        return json.dumps(d, sort_keys=True)


@dataclass(frozen=True)
class Decoded:
    """A preprocessed image: uint8 pixels, channels first, after resize and crop (normalising is done in batch)."""

    key: str
    pixels: np.ndarray


def to_rgb(image: Image.Image, alpha: str = "white") -> Image.Image:
    """Convert to RGB as transformers 5's convert_to_rgb does, transparency composited onto white; or, with alpha
    "drop", as transformers 4.x did (PickScore's training code): `convert("RGB")`, which discards the alpha channel
    (and a palette's transparent index) and keeps the colours under it."""
    if image.mode == "RGB":
        return image
    if alpha != "drop" and ("A" in image.getbands() or image.info.get("transparency") is not None):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def pillow_open(fp: IO[bytes]) -> Image.Image:
    """Image.open without Pillow's own decompression-bomb check (its warning on stderr, or its error): callers check
    max_pixels against the size read from the header, before any pixel is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(fp)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def check_pixels(image: Image.Image, max_pixels: int | None) -> None:
    """TooLarge when the image declares more than max_pixels pixels (None or 0: no limit)."""
    w, h = image.size
    if max_pixels and w * h > max_pixels:
        raise TooLarge(f"too large to decode safely: {w}x{h} = {w * h:,} pixels, limit {max_pixels:,} "
                       f"(raise it with --max-pixels)")


def open_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               spec: ImageSpec | None = None) -> Image.Image:
    """Decode the first frame of an image from bytes, refusing decompression bombs before decoding (and, with a
    spec, images whose resize would be too large: `check_geometry`); with a spec whose decode is "fast", a JPEG is
    decoded at reduced DCT scale (`fast_draft`)."""
    try:
        image = pillow_open(io.BytesIO(data))
        check_pixels(image, max_pixels)
        if spec is not None:
            check_geometry(*image.size, spec, max_pixels)
        image.seek(0)  # animated GIF/WebP/APNG: the first frame, as the reference's Image.open gives it
        if spec is not None and spec.decode == "fast":
            fast_draft(image, spec)
        image.load()
        return image
    except ReadError:
        raise
    except Image.UnidentifiedImageError:
        raise ReadError("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e)
        if "truncated" in msg.lower() or "broken data stream" in msg:
            raise ReadError("truncated image") from None
        raise ReadError(f"cannot decode: {msg}") from None


@dataclass(frozen=True)
class Geometry:
    """Where an image of a given size goes on its way to the model: the size to resize to (None: kept), then the
    zero padding around it (top, bottom, left, right: an image smaller than the crop, as transformers pads it),
    then the centre crop's (top, left, height, width) (None: no crop)."""

    resize: tuple[int, int] | None
    pad: tuple[int, int, int, int] | None
    crop: tuple[int, int, int, int] | None


def resize_crop_geometry(w: int, h: int, spec: ImageSpec) -> Geometry:
    """The CLIP processor's resize (shortest side, or a fixed size) and centre crop for a w x h image; used by the
    Pillow path (`preprocess`) and the torch path (`api.torch_preprocess`)."""
    size = (w, h)
    if spec.shortest_edge is not None:
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * long / short)
        size = (new_short, new_long) if w <= h else (new_long, new_short)
    elif spec.resize_hw is not None:
        size = (spec.resize_hw[1], spec.resize_hw[0])
    resize = size if size != (w, h) else None
    if spec.crop_hw is None:
        return Geometry(resize, None, None)
    (w, h), (ch, cw) = size, spec.crop_hw
    pad = None
    if h < ch or w < cw:
        ph, pw = max(ch, h), max(cw, w)
        top, left = (ph - h) // 2, (pw - w) // 2
        pad = (top, ph - h - top, left, pw - w - left)
        h, w = ph, pw
    return Geometry(resize, pad, ((h - ch) // 2, (w - cw) // 2, ch, cw))


def check_geometry(w: int, h: int, spec: ImageSpec, max_pixels: int | None) -> Geometry:
    """The geometry of a w x h image (`resize_crop_geometry`); ReadError for an image without pixels, TooLarge when
    its resize has more than max_pixels pixels (None or 0: no limit). The reference resizes the whole image before
    it crops, so a thin strip grows by the resize: 20000x1 pixels become 4480000x224."""
    if w < 1 or h < 1:
        raise ReadError(f"an image of {w}x{h} pixels has nothing to score")
    geo = resize_crop_geometry(w, h, spec)
    if geo.resize is not None and max_pixels:
        rw, rh = geo.resize
        if rw * rh > max_pixels:
            raise TooLarge(f"too large to resize safely: {w}x{h} resizes to {rw}x{rh} = {rw * rh:,} pixels before "
                           f"the crop, limit {max_pixels:,} (raise it with --max-pixels)")
    return geo


def fast_draft(image: Image.Image, spec: ImageSpec) -> None:
    """Ask libjpeg to decode a JPEG (not yet loaded) at the smallest DCT scale (1/2, 1/4, 1/8) still at least twice
    the resize's target on each side, so that the exact bicubic resize that follows still has 2x the pixels it
    keeps; other formats, and JPEGs too small to shrink, are left as they are."""
    if image.format != "JPEG":
        return
    target = resize_crop_geometry(*image.size, spec).resize
    if target is not None:
        image.draft("RGB", (2 * target[0], 2 * target[1]))


def preprocess(image: Image.Image, spec: ImageSpec, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Resize (PIL, as the reference) and centre-crop; return uint8 pixels shaped (3, H, W). ReadError for an image
    without pixels, TooLarge when the resize would exceed max_pixels (`check_geometry`)."""
    geo = check_geometry(*image.size, spec, max_pixels)
    if spec.convert_rgb:
        image = to_rgb(image, spec.alpha)
    elif image.mode != "RGB":
        image = image.convert("RGB")
    if geo.resize is not None:
        image = image.resize(geo.resize, resample=spec.resample, reducing_gap=None)
    arr = np.asarray(image)
    if geo.pad is not None:  # smaller than the crop: zeros around it
        top, bottom, left, right = geo.pad
        h, w = arr.shape[:2]
        out = np.zeros((top + h + bottom, left + w + right, 3), dtype=arr.dtype)
        out[top:top + h, left:left + w] = arr
        arr = out
    if geo.crop is not None:
        top, left, ch, cw = geo.crop
        arr = arr[top:top + ch, left:left + cw]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def normalize(pixels: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """uint8 (N, 3, H, W) -> float32 model input: rescale then normalise, as the reference processor."""
    x = pixels.astype(np.float32)
    if spec.rescale_factor is not None:
        x *= np.float32(spec.rescale_factor)
    if spec.image_mean is not None and spec.image_std is not None:
        mean = np.asarray(spec.image_mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(spec.image_std, dtype=np.float32).reshape(1, -1, 1, 1)
        x -= mean  # in place: no temporaries the size of the batch
        x /= std
    return x


def make_thumbnail(image: Image.Image, size: int = 256) -> bytes:
    """A small JPEG of the image (long side `size`), for HTML reports."""
    thumb = to_rgb(image).copy()
    thumb.thumbnail((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def decode_and_preprocess(key: str, data: bytes, spec: ImageSpec,
                          max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Decoded:
    """The worker's unit: bytes -> Decoded, or ReadError."""
    image = open_image(data, max_pixels, spec)
    try:
        pixels = preprocess(image, spec, max_pixels)
    except (OSError, ValueError) as e:
        raise ReadError(f"cannot decode: {e}") from None
    return Decoded(key, pixels)


def to_image(item: object, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A path, bytes, PIL image or uint8 numpy array (HWC or HW) -> PIL image, without torch (`api.to_pil` adds
    tensors); unreadable files raise InputFailed naming the file."""
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        try:
            return open_image(read_bytes(path), max_pixels)
        except ReadError as e:
            raise InputFailed(f"{path}: {e}") from None
    if isinstance(item, bytes):
        try:
            return open_image(item, max_pixels)
        except ReadError as e:
            raise InputFailed(f"image bytes: {e}") from None
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise UsageError(f"numpy images must be uint8 (H, W, 3) or (H, W), got {item.dtype}; for floats in "
                             "[0, 1] use (x * 255).round().clip(0, 255).astype(np.uint8)")
        if (item.ndim == 3 and item.shape[2] in (3, 4)) or item.ndim == 2:
            return Image.fromarray(np.ascontiguousarray(item))  # RGB, RGBA or L from the shape
        raise UsageError(f"numpy images must be shaped (H, W, 3), (H, W, 4) or (H, W), got {item.shape}")
    raise UsageError(f"unsupported image type {type(item).__name__}: give paths, PIL images, uint8 numpy "
                     "arrays or tensors")


def image_pixels(item: object, spec: ImageSpec, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """One image (as `to_image` takes it) by the exact path: the reference's Pillow preprocessing -> uint8 (3, H, W)."""
    return preprocess(to_image(item, max_pixels), spec, max_pixels)
