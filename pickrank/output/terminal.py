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
