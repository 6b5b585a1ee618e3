"""Read, decode and preprocess images exactly as the CLIP image processor does (no torch here: runs in workers)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import multiprocessing
import os
import select
import stat
import struct
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import IO, Iterator

import numpy as np
from PIL import Image, ImageFile

from pickrank.signals import ignore_stop_signals

# Pillow's own default limit on decoded pixels (about 89.5 megapixels); --max-pixels changes it.
DEFAULT_MAX_PIXELS = 89_478_485
# Files larger than this are refused before they are read (--max-bytes): far above any generated image, far below
# what would exhaust memory.
DEFAULT_MAX_BYTES = 512 << 20
# What is read of a file before the rest, to tell whether it is an image at all: Pillow picks most formats by their
# first 16 bytes; PCD's mark is at 2 KiB.
_HEAD_BYTES = 4096
# A PNG's text chunks are found by walking its chunk list: a crafted file of millions of tiny chunks stops here.
_MAX_PNG_CHUNKS = 100_000
_PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


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


class ReadError(Exception):
    """An image that cannot be read or decoded; the message is the short reason shown to users."""


def _open_regular(path: str) -> tuple[int, os.stat_result]:
    """A descriptor on path and its stat, or ReadError with a short reason unless it is a regular file.

    The file is opened without blocking and checked before anything is read, so a FIFO or a device named like an
    image is refused instead of hanging the run or reading forever.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except IsADirectoryError:
        raise ReadError("is a directory") from None
    except PermissionError:
        if os.path.isdir(path):  # a folder that cannot be listed (Windows cannot open folders at all)
            reason = "is a directory" if os.name == "nt" else "cannot read folder: permission denied"
            raise ReadError(reason) from None
        raise ReadError("permission denied") from None
    except FileNotFoundError:
        if os.path.islink(path):
            raise ReadError("broken symlink") from None
        raise ReadError("no such file") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ReadError("symlink loop") from None
        raise ReadError(e.strerror or str(e)) from None
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise ReadError(e.strerror or str(e)) from None
    reason = _not_regular(st.st_mode)
    if reason:
        os.close(fd)
        raise ReadError(reason)
    return fd, st


def _not_regular(mode: int) -> str | None:
    """Why a file of this mode is not read, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory"
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")
    return f"not a regular file ({kind})"


def check_size(size: int, max_bytes: int | None) -> None:
    """ReadError when a file of `size` bytes is over max_bytes (None: no limit)."""
    if max_bytes is not None and size > max_bytes:
        raise ReadError(f"too large: {size:,} bytes, limit {max_bytes:,} (raise it with --max-bytes)")


def _accepted(prefix: bytes) -> bool:
    """Whether a loaded Pillow plugin's own test accepts these first bytes (a string answer means 'recognised
    but not supported', which Image.open refuses too)."""
    for _factory, accept in list(Image.OPEN.values()):  # a copy: another thread may be loading plugins
        if accept is None:
            continue
        try:
            ok = accept(prefix)
        except Exception:  # a test written for a longer prefix
            continue
        if ok and not isinstance(ok, (str, bytes)):
            return True
    return False


def looks_like_image(head: bytes) -> bool:
    """Whether Pillow recognises a file starting with `head` as an image, as Image.open picks a format: each
    plugin's test on the first 16 bytes, or, for the few formats without one (TGA, SPIDER, ...), the plugin's
    header parser run on `head`."""
    Image.preinit()
    if _accepted(head[:16]):
        return True
    Image.init()  # every plugin, as Image.open loads them when the common ones do not match
    if _accepted(head[:16]):
        return True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for factory, accept in list(Image.OPEN.values()):
            if accept is None:
                try:
                    factory(io.BytesIO(head), "")
                    return True
                except Exception:  # not this format (SyntaxError), or a header cut short
                    continue
    return False


@contextlib.contextmanager
def _image_file(path: str, max_bytes: int | None) -> Iterator[tuple[io.FileIO, int]]:
    """The file at path, open at offset 0, with its size; ReadError (with a short reason) unless it is a regular,
    non-empty file whose first bytes Pillow recognises as an image, within max_bytes: only _HEAD_BYTES are read to
    tell, so a huge file costs nothing."""
    fd, st = _open_regular(path)
    try:
        f = os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise
    with f:
        try:
            head = f.read(_HEAD_BYTES)
            if not head:
                raise ReadError("empty file")
            if not looks_like_image(head):  # first: a larger --max-bytes would not help
                raise ReadError("not an image (unrecognised format)")
            check_size(st.st_size, max_bytes)
            f.seek(0)
            yield f, st.st_size
        except OSError as e:
            raise ReadError(e.strerror or str(e)) from None


def read_bytes(path: str, max_bytes: int | None = DEFAULT_MAX_BYTES) -> bytes:
    """The file's bytes, or ReadError with a short reason.

    Only regular files are read (see _open_regular), only up to max_bytes (None: no limit), and only when their
    first bytes are an image format Pillow knows: a 3 GB file of zeros named x.png is refused after 4 KiB.
    """
    with _image_file(path, max_bytes) as (f, size):
        data = f.read(size)
        if f.read(1):  # it grew since it was opened (or its size is not known): read it again, within the limit
            f.seek(0)
            data = _read_capped(f, max_bytes)
    return data


def _read_capped(f: IO[bytes], max_bytes: int | None) -> bytes:
    """The rest of f, read in pieces, refused as soon as it passes max_bytes."""
    parts: list[bytes] = []
    total = 0
    while part := f.read(1 << 20):
        total += len(part)
        check_size(total, max_bytes)
        parts.append(part)
    return b"".join(parts)


def content_key(data: bytes) -> str:
    """SHA-256 of the bytes: images are identified by content, so copies count once."""
    return hashlib.sha256(data).hexdigest()


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


def _pillow_open(fp: IO[bytes]) -> Image.Image:
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


def _check_pixels(image: Image.Image, max_pixels: int | None) -> None:
    """ReadError when the image declares more than max_pixels pixels (None or 0: no limit)."""
    w, h = image.size
    if max_pixels and w * h > max_pixels:
        raise ReadError(f"too large to decode safely: {w}x{h} = {w * h:,} pixels, limit {max_pixels:,} "
                        f"(raise it with --max-pixels)")


def open_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               spec: ImageSpec | None = None) -> Image.Image:
    """Decode the first frame of an image from bytes, refusing decompression bombs before decoding; with a spec
    whose decode is "fast", a JPEG is decoded at reduced DCT scale (`fast_draft`)."""
    try:
        image = _pillow_open(io.BytesIO(data))
        _check_pixels(image, max_pixels)
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


def read_text_metadata(path: str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                       max_bytes: int | None = DEFAULT_MAX_BYTES) -> dict[str, str]:
    """An image file's text metadata, without decoding a pixel: a PNG's text chunks (tEXt, zTXt, iTXt, wherever
    they are), else the text fields Pillow reads from other formats' headers.

    The file is checked as for scoring (read_bytes: regular files only, max_bytes, a format Pillow knows) and its
    declared size against max_pixels (open_image); ReadError otherwise.
    """
    with _image_file(path, max_bytes) as (f, _size):
        try:
            with _pillow_open(f) as image:  # reads the header only
                _check_pixels(image, max_pixels)
                if image.format == "PNG":
                    return _png_text(f)
                return {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
        except Image.UnidentifiedImageError:
            raise ReadError("not an image (unrecognised format)") from None
        except (SyntaxError, ValueError, EOFError, struct.error) as e:
            raise ReadError(f"cannot read: {e}") from None


def _png_text(f: IO[bytes]) -> dict[str, str]:
    """Every text chunk of a PNG, before or after the image data, by walking its chunk list: the image data is
    skipped, never inflated (Image.text would decode the whole image to reach chunks after it). Pillow's own chunk
    readers parse the text, with their limits on text size."""
    from PIL import PngImagePlugin

    f.seek(8)  # past the signature
    stream = PngImagePlugin.PngStream(f)
    for _ in range(_MAX_PNG_CHUNKS):
        try:
            cid, pos, length = stream.read()
        except (struct.error, SyntaxError, ValueError):  # the end of a truncated or broken file
            break
        if cid == b"IEND":
            break
        if cid in _PNG_TEXT_CHUNKS and length <= PngImagePlugin.MAX_TEXT_MEMORY:
            try:
                stream.call(cid, pos, length)
            except (OSError, SyntaxError, ValueError):  # a chunk cut short, too large or malformed: skipped
                pass
        f.seek(pos + length + 4)  # the next chunk, past this one's data and CRC
    return {k: str(v) for k, v in stream.im_text.items()}


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


def fast_draft(image: Image.Image, spec: ImageSpec) -> None:
    """Ask libjpeg to decode a JPEG (not yet loaded) at the smallest DCT scale (1/2, 1/4, 1/8) still at least twice
    the resize's target on each side, so that the exact bicubic resize that follows still has 2x the pixels it
    keeps; other formats, and JPEGs too small to shrink, are left as they are."""
    if image.format != "JPEG":
        return
    target = resize_crop_geometry(*image.size, spec).resize
    if target is not None:
        image.draft("RGB", (2 * target[0], 2 * target[1]))


def preprocess(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Resize (PIL, as the reference) and centre-crop; return uint8 pixels shaped (3, H, W)."""
    if spec.convert_rgb:
        image = to_rgb(image, spec.alpha)
    elif image.mode != "RGB":
        image = image.convert("RGB")
    geo = resize_crop_geometry(*image.size, spec)
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
        pixels = preprocess(image, spec)
    except (OSError, ValueError) as e:
        raise ReadError(f"cannot decode: {e}") from None
    return Decoded(key, pixels)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool for decode jobs: forkserver on POSIX (workers inherit no threads or locks of this process),
    each worker forked from a server that imported this module once (`pickrank.inputs._forkserver`), never
    `__main__`."""
    ctx = multiprocessing.get_context("forkserver" if os.name == "posix" else "spawn")
    if os.name == "posix":
        ctx.set_forkserver_preload(["pickrank.inputs._forkserver"])
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=worker_init, initargs=(os.getpid(),))


def close_pool(pool: ProcessPoolExecutor) -> None:
    """Shut a pool down, dropping queued jobs. An OSError from its internals meanwhile (a wake-up pipe already
    closed after an interrupt: CPython 3.11's executor) must not replace the reason the run is stopping."""
    try:
        pool.shutdown(wait=True, cancel_futures=True)
    except OSError:
        pass


def worker_init(parent: int | None = None) -> None:
    """Initialise a decode worker process: deaf to stop signals, gone within a second of its parent (`parent`'s pid)."""
    ignore_stop_signals()
    if parent is not None:
        threading.Thread(target=_exit_after, args=(parent,), name="pickrank-parent-watch", daemon=True).start()
    # One image per worker at a time: numpy/Pillow must not fan out into more threads.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _exit_after(pid: int) -> None:
    """End this process once process `pid` has ended (SIGKILL, the OOM killer): no pool is left to stop it, and it
    would keep the run's stdout, its fork server and resource tracker alive."""
    try:
        fd = os.pidfd_open(pid)  # Linux >= 5.3: readable once the process has ended
    except (AttributeError, OSError):
        while _alive(pid):
            time.sleep(0.5)
    else:
        select.select([fd], [], [])
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process has taken the number: ours is gone
        return False
    return True


def decode_job(key: str, data: bytes, spec: ImageSpec, max_pixels: int | None) -> Decoded | str:
    """A worker's unit (this module imports no torch, so workers stay small): pixels, or the reason as a string."""
    try:
        return decode_and_preprocess(key, data, spec, max_pixels)
    except ReadError as e:
        return str(e)
    except Exception as e:  # a decoder bug must not kill the run: report it like any bad file
        return f"cannot decode: {type(e).__name__}: {e}"


def decode_many(jobs: list[tuple[str, bytes]], spec: ImageSpec, max_pixels: int | None) -> list[Decoded | str]:
    """decode_job over a chunk of images (one round trip to a worker)."""
    return [decode_job(key, data, spec, max_pixels) for key, data in jobs]


# Truncated files must fail, not be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def to_image(item: object, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A path, bytes, PIL image or uint8 numpy array (HWC or HW) -> PIL image, without torch (`api.to_pil` adds
    tensors); unreadable files raise InputFailed naming the file."""
    from pickrank.errors import InputFailed, UsageError

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
    return preprocess(to_image(item, max_pixels), spec)
