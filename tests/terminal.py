"""Run a command in a pseudo-terminal (stdout and stderr both a terminal, as for a person) and read what it shows."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SGR = re.compile(r"\x1b\[[0-9;]*m")


def run_in_pty(args: list[str], env: dict[str, str], cwd: Path, cols: int = 100, timeout: float = 180,
               typed: str | None = None) -> tuple[int, str]:
    """`python ARGS` in a pseudo-terminal `cols` wide: (exit code, everything it wrote, escapes included). With
    `typed`, stdin is the terminal too, and `typed` is what the person types."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
    proc = subprocess.Popen([sys.executable, *args], stdin=subprocess.DEVNULL if typed is None else slave,
                            stdout=slave, stderr=slave, env={**env, "PYTHONPATH": str(ROOT), "COLUMNS": str(cols)},
                            cwd=cwd, close_fds=True)
    os.close(slave)
    if typed is not None:
        os.write(master, typed.encode())
    out = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            if not ready:
                raise TimeoutError(f"no output for {timeout} s: {out[-500:]!r}")
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
    return proc.returncode, out.decode("utf-8", "replace")


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
