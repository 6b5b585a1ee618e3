"""Guarded file access: regular files only, within --max-bytes, the format told from the first bytes; the content
key; a PNG's text chunks found without decoding a pixel (no torch here: runs in workers)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import stat
import struct
import warnings
from typing import IO, Iterator

from PIL import Image

# Files larger than this are refused before they are read (--max-bytes): far above any generated image, far below
# what would exhaust memory.
DEFAULT_MAX_BYTES = 512 << 20
# What is read of a file before the rest, to tell whether it is an image at all: Pillow picks most formats by their
# first 16 bytes; PCD's mark is at 2 KiB.
_HEAD_BYTES = 4096
# A PNG's text chunks are found by walking its chunk list: a crafted file of millions of tiny chunks stops here.
_MAX_PNG_CHUNKS = 100_000
_PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")


class ReadError(Exception):
    """An image that cannot be read or decoded; the message is the short reason shown to users."""


class TooLarge(ReadError):
    """A file over --max-bytes, or an image declaring more pixels than --max-pixels (the server answers 413)."""


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


def open_regular(path: str) -> io.FileIO:
    """A regular file at path, open for reading (unbuffered); ReadError with a short reason for anything else (a
    FIFO, a device, a folder, a missing file), checked before a byte is read."""
    fd, _ = _open_regular(path)
    try:
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def check_size(size: int, max_bytes: int | None) -> None:
    """TooLarge when a file of `size` bytes is over max_bytes (None: no limit)."""
    if max_bytes is not None and size > max_bytes:
        raise TooLarge(f"too large: {size:,} bytes, limit {max_bytes:,} (raise it with --max-bytes)")


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
def image_file(path: str, max_bytes: int | None) -> Iterator[tuple[io.FileIO, int]]:
    """The file at path, open at offset 0, with its size; ReadError (with a short reason) unless it is a regular,
    non-empty file whose first bytes Pillow recognises as an image, within max_bytes: only the first 4 KiB are read
    to tell, so a huge file costs nothing."""
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
    with image_file(path, max_bytes) as (f, size):
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


def png_text(f: IO[bytes]) -> dict[str, str | bytes]:
    """Every text chunk of a PNG, before or after the image data, by walking its chunk list: the image data is
    skipped, never inflated (Image.text would decode the whole image to reach chunks after it). Pillow's own chunk
    readers parse the text, with their limits on text size; an iTXt chunk they refuse (its text is not UTF-8) is
    there as its raw bytes, so that it reads as unreadable rather than absent."""
    from PIL import PngImagePlugin

    f.seek(8)  # past the signature
    stream = PngImagePlugin.PngStream(f)
    refused: dict[str, bytes] = {}
    for _ in range(_MAX_PNG_CHUNKS):
        try:
            cid, pos, length = stream.read()
        except (struct.error, SyntaxError, ValueError):  # the end of a truncated or broken file
            break
        if cid == b"IEND":
            break
        if cid in _PNG_TEXT_CHUNKS and length <= PngImagePlugin.MAX_TEXT_MEMORY:
            raw = f.read(length) if cid == b"iTXt" else b""
            f.seek(pos)
            try:
                stream.call(cid, pos, length)
            except (OSError, SyntaxError, ValueError):  # a chunk cut short, too large or malformed: skipped
                pass
            key = raw.partition(b"\0")[0].decode("latin-1")
            if raw and key not in stream.im_text:
                refused[key] = raw
        f.seek(pos + length + 4)  # the next chunk, past this one's data and CRC
    return {**refused, **{k: str(v) for k, v in stream.im_text.items()}}
