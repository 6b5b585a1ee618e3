"""The frozen dataclasses that flow between pipeline stages."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Iterable, Sequence, Union

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass(frozen=True)
class ImageBytes:
    """An image already in memory (eval's parquet rows): read as it is; `name` stands for it in records."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Unreadable:
    """A dataset sample found unusable while its shard was read (over --max-bytes, not an image, no caption, an
    unsafe member): an error record under `name`, nothing to decode."""

    name: str
    error: str


# What a candidate set lists: image paths, images in memory, or samples already known to be unusable.
Item = Union[str, ImageBytes, Unreadable]


@dataclass(frozen=True)
class Query:
    """One ranking to produce: a prompt, with the CSV id or best-of-n group it came from."""

    prompt: str
    id: str | None = None
    group: str | None = None
    # Where the prompt came from: option (--prompt), prompt.txt, csv, or a metadata format (metadata.SOURCES).
    prompt_source: str | None = None


@dataclass(frozen=True)
class CandidateSet:
    """Images ranked together, once for each of `queries`; `error` marks a set that cannot be scored."""

    queries: tuple[Query, ...]
    paths: Iterable[Item] = ()
    error: str | None = None
    # Where the set came from (a best-of-n group folder, a CSV row's `images`), for error records.
    source: str | None = None


@dataclass(frozen=True)
class Record:
    """One output row: an image's score for a prompt, or an error for that image or set."""

    prompt: str | None
    path: str | None
    score: float | None = None
    prob: float | None = None
    rank: int | None = None
    id: str | None = None
    group: str | None = None
    error: str | None = None
    truncated: bool = False
    copied_to: str | None = None
    prompt_source: str | None = None  # the query's: option, prompt.txt, csv or a metadata format
    # A dataset sample's: its key in its shard, its 128-bit uid when it has one, and the shard it came from.
    key: str | None = None
    uid: str | None = None
    shard: str | None = None

    def to_dict(self, fields: tuple[str, ...]) -> dict:
        """The record as a dict with exactly `fields`, in that order."""
        d = asdict(self)
        return {k: d[k] for k in fields}


@dataclass
class RunSummary:
    """Counts the CLI reports at the end of a run."""

    images: int = 0
    embedded: int = 0
    cache_hits: int = 0
    failures: int = 0
    rankings: int = 0
    truncated: int = 0  # prompts cut at 77 tokens (each time one is encoded)
    scored: int = 0  # finite scores given (records ranked)
    nonfinite: int = 0  # embeddings or scores that came out NaN or infinite: error records, never ranks


@dataclass(frozen=True)
class Entry:
    """One image of a set after the read stage: its name, its content key, or why it could not be read."""

    path: str
    key: str | None
    error: str | None = None


@dataclass(frozen=True)
class Finished:
    """What a backend hands back: embedded keys with their (N, D) fp32 embeddings on the CPU (None when there are
    none), and the keys that failed, with the reason."""

    keys: Sequence[str] = ()
    embeddings: "torch.Tensor | np.ndarray | None" = None
    failures: Sequence[tuple[str, str]] = ()


@dataclass(frozen=True)
class Progress:
    """Where a run stands, as the engine and the model loader report it (the CLI draws it as one bar).

    phase: "discovering" (finding the images), "downloading" (the model's weights: `done` and `total` in bytes,
    `detail` the file), "loading" (the model), "embedding" (images: `done` of `total`, None while discovery still
    runs), "writing" (outputs; the bar steps aside), "done".
    """

    phase: str
    done: int = 0
    total: int | None = None
    embedded: int = 0  # images that went through the model
    cached: int = 0  # images answered by the embedding cache
    failed: int = 0  # images (or sets) that could not be scored
    detail: str = ""
