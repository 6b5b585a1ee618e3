"""What every generator parser shares: `FoundPrompt` (the answer), `Parser` (one family's entry), and reading JSON
and prompt text out of metadata fields."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class FoundPrompt:
    """The positive prompt found in an image's metadata, the format it came from, and why not when there is none."""

    prompt: str | None
    source: str | None  # one of metadata.SOURCES; None when no known format was found
    reason: str | None = None  # when prompt is None: why, in a few words
    field: str | None = None  # where in the file: 'parameters', 'EXIF UserComment', 'prompt graph', ...


def no_prompt(reason: str, source: str | None = None, field: str | None = None) -> FoundPrompt:
    """No prompt found, and why (in a few words); `source` when the format was recognised."""
    return FoundPrompt(None, source, reason, field)


@dataclass(frozen=True)
class Parser:
    """One generator family: the sources (of SOURCES) its answers may name, and the function that finds its prompt
    in the metadata fields as text (None: not this family's format)."""

    sources: tuple[str, ...]
    parse: Callable[[dict[str, str]], FoundPrompt | None]


_TOO_DEEP = object()  # what json_value gives for a document nested too deep to parse: JSON, though unreadable


def json_value(text: str | None) -> Any:
    """The JSON value text holds, _TOO_DEEP when it is nested too deep to parse, None when it is not JSON."""
    if not text or text.lstrip()[:1] not in ("{", "["):
        return None
    try:
        return json.loads(text)
    except RecursionError:
        return _TOO_DEEP
    except ValueError:
        return None


def is_json(text: str) -> bool:
    """Whether text holds a JSON document (an object or an array)."""
    return json_value(text) is not None


def clean_text(text: object) -> str | None:
    """text stripped, or None when it is not a non-empty string or is a JSON document."""
    if not isinstance(text, str) or not text.strip() or is_json(text):
        return None
    return text.strip()


def join_texts(texts: list[str]) -> str | None:
    """Several prompt texts as one: distinct texts in order, joined with ', ' (trailing commas dropped)."""
    out: list[str] = []
    for text in texts:
        text = text.strip().rstrip(",").strip()
        if text and text not in out:
            out.append(text)
    return ", ".join(out) if out else None
