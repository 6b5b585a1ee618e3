"""EXIF: the fields generators write there (A1111's UserComment, ComfyUI's WebP tags, Fooocus), read from the header
Pillow has already parsed, and decoded to text by their charset header."""

from __future__ import annotations

import re

from PIL import Image

# Keys under which the parsers find the EXIF fields read_image_metadata adds (raw, undecoded).
EXIF_USER_COMMENT = "exif:UserComment"
EXIF_PREFIX = "exif:"
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
# ComfyUI's WebP: 0x0110 (Model) = "prompt:<json>", 0x010F (Make) = "workflow:<json>", further extra_pnginfo keys
# counting down from there (0x010E ImageDescription, ...).
_EXIF_TEXT_TAGS = {0x010D: "DocumentName", 0x010E: "ImageDescription", 0x010F: "Make", 0x0110: "Model",
                   0x0131: "Software", 0x927C: "MakerNote"}
# A UserComment's 8-byte charset header: a name in capitals padded with NULs (UNICODE, ASCII, JIS, ...).
_CHARSET_HEADER = re.compile(rb"[A-Z][A-Z0-9_]{0,6}\0+")


def exif_fields(image: Image.Image) -> dict[str, str | bytes]:
    """The EXIF fields generators use, from the header Pillow has already read (JPEG APP1, WebP EXIF chunk)."""
    try:
        return _exif_tags(image)
    except Exception:  # a broken EXIF block (Pillow raises many kinds): the image and its other fields still count
        return {}


def _exif_tags(image: Image.Image) -> dict[str, str | bytes]:
    """The text tags of IFD0 and the UserComment (in the EXIF IFD, or IFD0 where Fooocus puts it), raw."""
    exif = image.getexif()
    out: dict[str, str | bytes] = {}
    for tag, name in _EXIF_TEXT_TAGS.items():
        value = exif.get(tag)
        if isinstance(value, (str, bytes)):
            out[EXIF_PREFIX + name] = value
    comment = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if comment is None:
        comment = exif.get(_USER_COMMENT)  # Fooocus puts it in IFD0
    if isinstance(comment, (str, bytes)):
        out[EXIF_USER_COMMENT] = comment
    return out


def decode_user_comment(raw: bytes | str) -> str:
    """The text of an EXIF UserComment: an 8-byte charset header (`UNICODE\\0`: UTF-16, by its BOM or else by where
    the zero bytes are, big-endian as A1111 writes it through piexif; `ASCII`; `JIS`; zeros: undefined) or none.
    A header naming another charset is a ValueError: its text cannot be read (and the header is never text)."""
    if isinstance(raw, str):
        return raw.rstrip("\0")
    head, body = raw[:8], raw[8:]
    if head == b"UNICODE\0":
        body = body[:len(body) - len(body) % 2]  # a dangling last byte is half a character: not text
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            text = body.decode("utf-16", errors="replace")
        else:
            text = body.decode(_utf16_order(body), errors="replace")
    elif head == b"ASCII\0\0\0":
        text = body.decode("utf-8", errors="replace")  # ASCII by the standard; some writers put UTF-8 there
    elif head == b"JIS\0\0\0\0\0":
        text = body.decode("shift_jis", errors="replace")
    elif head == b"\0" * 8:
        text = body.decode("utf-8", errors="replace")
    elif _CHARSET_HEADER.fullmatch(head):
        name = head.rstrip(b"\0").decode("ascii")
        raise ValueError(f"the EXIF UserComment is in a charset pickrank cannot read ({name})")
    else:  # no header at all (written as a plain string)
        text = raw.decode("utf-8", errors="replace")
    return text.rstrip("\0")


def _utf16_order(body: bytes) -> str:
    """utf_16_le when the zero bytes of mostly-Latin text are at odd offsets, else utf_16_be (A1111, piexif)."""
    even = body[0::2].count(0)
    odd = body[1::2].count(0)
    return "utf_16_le" if odd > even else "utf_16_be"


def _exif_text(value: str | bytes) -> str:
    """An EXIF string tag as text: Pillow gives ASCII tags as Latin-1; UTF-8 written there is recovered."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace").rstrip("\0")
    try:
        return value.encode("latin-1").decode("utf-8").rstrip("\0")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value.rstrip("\0")


def text_fields(info: dict[str, str | bytes]) -> dict[str, str]:
    """The fields as text: the UserComment decoded by its charset header, EXIF strings as UTF-8, bytes dropped (and a
    UserComment that cannot be read: see unreadable_fields)."""
    out: dict[str, str] = {}
    for key, value in info.items():
        if key == EXIF_USER_COMMENT and isinstance(value, (str, bytes)):
            try:
                out[key] = decode_user_comment(value)
            except ValueError:
                continue
        elif key.startswith(EXIF_PREFIX) and isinstance(value, (str, bytes)):
            out[key] = _exif_text(value)
        elif isinstance(value, str):
            out[key] = value
    return out


def unreadable_fields(info: dict[str, str | bytes]) -> dict[str, str]:
    """The fields that are there but cannot be read as text, and why: a PNG text chunk that is not valid UTF-8
    (kept as bytes by `files.png_text`), a UserComment in an unknown charset."""
    out: dict[str, str] = {}
    for key, value in info.items():
        if key == EXIF_USER_COMMENT and isinstance(value, bytes):
            try:
                decode_user_comment(value)
            except ValueError as e:
                out[key] = str(e)
        elif not key.startswith(EXIF_PREFIX) and isinstance(value, bytes):
            out[key] = f"the {key!r} text cannot be read (not UTF-8, or badly compressed)"
    return out
