"""A dataset sample as the readers hand it over, and the checks that make it an image to score or an error record."""

from __future__ import annotations

from dataclasses import dataclass

from pickrank.inputs.files import looks_like_image
from pickrank.records import ImageBytes, Unreadable

# What is looked at of an image to tell its format, as for files.
HEAD_BYTES = 4096
# A 128-bit uid in hex (DataComp's): what `pickrank filter --uids` writes as two unsigned 64-bit halves.
UID_HEX_DIGITS = 32


class ShardError(Exception):
    """A shard that cannot be read on from some point (not a tar or parquet file, truncated, corrupt): what came
    before it is scored; the message names where (an offset or a row group)."""


@dataclass(frozen=True)
class Sample:
    """One sample of a shard: its key, where it starts, and its image, caption and uid (or why it is unusable)."""

    key: str | None
    where: str  # "offset N" in a tar, "row N" in a parquet file
    image: bytes | None = None
    caption: str | None = None
    uid: str | None = None
    error: str | None = None


def sample_name(shard: str, key: str | None, where: str) -> str:
    """How a sample is named in messages and records: its shard and key (or its place, without a key)."""
    return f"{shard}#{key if key is not None else where}"


def unusable(sample: Sample, need_caption: bool) -> str | None:
    """Why a sample cannot be scored, or None: its reader's error, no image, not an image (told from its first
    bytes, as for files), or under --prompt-from caption no caption."""
    if sample.error is not None:
        return sample.error
    if sample.image is None:
        return "no image in this sample"
    if not sample.image:
        return "empty image"
    if not looks_like_image(sample.image[:HEAD_BYTES]):
        return "not an image (unrecognised format)"
    if need_caption and not (sample.caption or "").strip():
        return "no caption (give --prompt to score it)"
    return None


def to_item(sample: Sample, name: str, need_caption: bool) -> ImageBytes | Unreadable:
    """The engine's item for a sample: its image in memory, or an Unreadable saying why not."""
    reason = unusable(sample, need_caption)
    if reason is not None:
        return Unreadable(name, reason)
    return ImageBytes(name, sample.image)  # type: ignore[arg-type]


def uid_halves(uid: str) -> tuple[int, int] | None:
    """A 128-bit hex uid as its upper and lower 64-bit halves (DataComp's `u8,u8`), or None if it is not one."""
    if len(uid) != UID_HEX_DIGITS:
        return None
    try:
        return int(uid[:16], 16), int(uid[16:], 16)
    except ValueError:
        return None
