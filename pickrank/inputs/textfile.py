"""Reading the user's text inputs (prompt CSVs, eval CSV/JSONL) as UTF-8, with a one-line error for anything else;
the checks every prompt and every JSON document from outside pass (CLI, API, server)."""

from __future__ import annotations

import codecs
import json
from typing import Any

from pickrank.errors import InvalidText, UsageError

MAX_JSON_DEPTH = 64  # arrays and objects nested in each other; pickrank's own documents need fewer than 10


def decode_utf8(raw: bytes, name: str) -> str:
    """raw as UTF-8 (a leading BOM dropped); a UsageError naming the line and byte of the first bad one."""
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start  # the codec counts from after the BOM; the user counts from the file's start
        line = raw[:at].count(b"\n") + 1
        raise UsageError(f"{name}: not UTF-8 (line {line}, byte {at}: {raw[at:at + 1]!r}); save it as UTF-8"
                         ) from None


def read_utf8(path: str) -> str:
    """The whole text file, decoded by `decode_utf8`; a UsageError when it cannot be read."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror or e}") from None
    return decode_utf8(raw, path)


def check_text(text: str, where: str) -> str:
    """`text` itself when it can be a prompt: no lone surrogate (what bytes that were not UTF-8 become, and what no
    tokenizer takes) and no NUL; an InvalidText naming `where`, the character and its position otherwise."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidText(f"{where}: not valid text: a lone surrogate U+{ord(text[e.start]):04X} at character "
                          f"{e.start} (bytes that are not UTF-8?)") from None
    nul = text.find("\0")
    if nul >= 0:
        raise InvalidText(f"{where}: not valid text: a NUL character at character {nul}")
    return text


def nesting_depth_over(doc: Any, limit: int) -> bool:
    """Whether arrays and objects nest in `doc` deeper than `limit` levels (walked without recursion)."""
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def loads_json(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads, with nesting bounded: a document nested deeper than `max_depth` levels is a ValueError, as
    malformed JSON is (never a RecursionError). Bytes must be UTF-8."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("utf-8")  # strict: json.loads' own decoding of bytes is several times slower
    try:
        doc = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested deeper than {max_depth} levels") from None
    if isinstance(doc, (dict, list)) and nesting_depth_over(doc, max_depth):
        raise ValueError(f"nested deeper than {max_depth} levels")
    return doc
