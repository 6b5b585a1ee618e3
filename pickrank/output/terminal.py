"""Text on its way to a terminal: control characters shown as escapes, so a crafted name cannot drive the terminal."""

from __future__ import annotations

import re

# C0 (newline and tab too: messages are one line), DEL, C1 (U+0080-U+009F: 8-bit CSI and friends), and the
# surrogate escapes that stand for the undecodable bytes of a file name (they cannot be encoded for output).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\udc80-\udcff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    o = ord(c)
    return _NAMED.get(c) or f"\\x{o - 0xDC00 if o >= 0xDC80 else o:02x}"


def terminal_safe(text: str) -> str:
    """text with each control character written as a visible escape (ESC as \\x1b, newline as \\n); the rest,
    backslashes included, unchanged. For tables and messages only: machine formats keep the real text."""
    return _UNSAFE.sub(_escape, text)


def print_titled(console: object, title: str, table: object) -> None:
    """A rich table with its title on a line of its own above it: the title wraps between words at the console's
    width (not within the table's, often narrower), and is not padded to the table's width. `title` is plain text
    (shown as written, control characters escaped)."""
    from rich.text import Text

    console.print(Text(terminal_safe(title), style="italic"))  # type: ignore[attr-defined]
    console.print(table)  # type: ignore[attr-defined]
