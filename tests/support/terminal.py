"""Run a command in a pseudo-terminal (stdout and stderr both a terminal, as for a person) and read what it shows."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from pickrank import devtools

ROOT = Path(__file__).resolve().parents[1]
_SGR = re.compile(r"\x1b\[[0-9;]*m")


def run_in_pty(args: list[str], env: dict[str, str], cwd: Path, cols: int = 100, timeout: float = 180,
               typed: str | None = None) -> tuple[int, str]:
    """`python ARGS` in a pseudo-terminal `cols` wide (this tree's code): (exit code, everything it wrote)."""
    return devtools.run_in_pty([sys.executable, *args], {**env, "PYTHONPATH": str(ROOT)}, cwd, cols, timeout, typed)


def screen(raw: str) -> list[str]:
    """The lines a terminal shows after `raw`: carriage returns go back to the line's start, ESC[K erases the rest
    of the line, colours are dropped."""
    lines: list[str] = []
    line: list[str] = []
    col = 0
    i = 0
    text = _SGR.sub("", raw).replace("\r\n", "\n")
    while i < len(text):
        if text.startswith("\x1b[K", i):
            del line[col:]
            i += 3
            continue
        c = text[i]
        i += 1
        if c == "\n":
            lines.append("".join(line))
            line, col = [], 0
        elif c == "\r":
            col = 0
        else:
            if col < len(line):
                line[col] = c
            else:
                line.append(c)
            col += 1
    if line:
        lines.append("".join(line))
    return lines
