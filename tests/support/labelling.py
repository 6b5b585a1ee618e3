"""A real `pickrank label` subprocess on a free loopback port (the label page's tests and its latency benchmark)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Iterator

from tests.support.commands import pickrank_cmd


@dataclass
class Labelling:
    """A `pickrank label` subprocess: the page's URL, and its stderr as it comes."""

    proc: subprocess.Popen
    url: str
    stderr: list[str] = field(default_factory=list)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        """End the session as a user does (Ctrl-C); its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@contextlib.contextmanager
def running_label(*args: str, env: dict | None = None) -> Iterator[Labelling]:
    """Start `pickrank label ARGS --port 0` and read the URL it prints; always stopped (SIGINT, then SIGKILL)."""
    proc = subprocess.Popen(pickrank_cmd("label", "--port", "0", *args), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})},
                            start_new_session=True)
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            lines.append(line)
            if "labelling" in line and "http://" in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not found.wait(90):
            raise AssertionError(f"no URL printed: {''.join(lines)}")
        line = next(text for text in lines if "http://" in text)
        yield Labelling(proc, re.search(r"http://[^\s/]+", line).group(0), lines)  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
