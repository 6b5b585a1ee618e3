"""The frozen dataclasses that flow between pipeline stages."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable


@dataclass(frozen=True)
class Query:
    """One ranking to produce: a prompt, with the CSV id or best-of-n group it came from."""

    prompt: str
    id: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class CandidateSet:
    """Images ranked together, once for each of `queries`; `error` marks a set that cannot be scored."""

    queries: tuple[Query, ...]
    paths: Iterable[str] = ()
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
    truncated_prompts: list[str] = field(default_factory=list)
