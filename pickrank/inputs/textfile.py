"""Reading the user's text inputs (prompt CSVs, eval CSV/JSONL) as UTF-8, with a one-line error for anything else."""

from __future__ import annotations

import codecs

from pickrank.errors import UsageError


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
