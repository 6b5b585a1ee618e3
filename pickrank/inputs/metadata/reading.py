"""An image file's metadata fields, read through the guarded file access without decoding a pixel."""

from __future__ import annotations

import struct
import warnings

from PIL import Image

from pickrank.inputs.decode import DEFAULT_MAX_PIXELS, check_pixels, pillow_open
from pickrank.inputs.files import DEFAULT_MAX_BYTES, ReadError, image_file, png_text
from pickrank.inputs.metadata.exif import exif_fields


def read_image_metadata(path: str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                        max_bytes: int | None = DEFAULT_MAX_BYTES) -> dict[str, str | bytes]:
    """An image's text metadata, without decoding a pixel: a PNG's text chunks (tEXt, zTXt, iTXt, wherever they
    are), else the text fields Pillow reads from other formats' headers plus the EXIF fields generators write to
    (`exif:UserComment` raw, `exif:Make`, ...); ReadError otherwise.

    The file is opened as for scoring: regular files only, within max_bytes, declared size within max_pixels.
    """
    with image_file(path, max_bytes) as (f, _size), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's "Corrupt EXIF data" UserWarning (at open) would reach stderr
        try:
            with pillow_open(f) as image:  # reads the header only
                check_pixels(image, max_pixels)
                if image.format == "PNG":  # getexif() on a PNG may decode it all to reach an eXIf chunk
                    return dict(png_text(f))
                info: dict[str, str | bytes] = {k: v for k, v in image.info.items()
                                                if isinstance(k, str) and isinstance(v, str)}
                info.update(exif_fields(image))
                return info
        except Image.UnidentifiedImageError:
            raise ReadError("not an image (unrecognised format)") from None
        except (SyntaxError, ValueError, EOFError, OSError, struct.error) as e:
            raise ReadError(f"cannot read: {e}") from None
