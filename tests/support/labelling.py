"""A real `pickrank label` subprocess on a free loopback port (the label page's tests and its latency benchmark)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from dataclasses import dataclass, field
from typing import Iterator

from tests.support.commands import pickrank_cmd
from tests.support.server import running_command


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
    """Start `pickrank label ARGS --port 0` and read the URL it prints; always stopped."""
    with running_command(pickrank_cmd("label", "--port", "0", *args), "labelling", env) as (proc, url, lines):
        yield Labelling(proc, url, lines)
