"""Running the real CLI as a subprocess and measuring its peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.commands import invoke, pickrank_cmd

GIB = 1 << 30


@dataclass
class Run:
    code: int
    stdout: bytes
    stderr: bytes
    max_rss: int | None  # peak resident memory of the CLI process, in bytes (None: run in this process)

    @property
    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.stdout.decode().splitlines() if line.strip()]

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="backslashreplace")


def run_cli(model_dir: Path, tmp_path: Path, *args: str, timeout: float = 120, preexec_fn=None) -> Run:
    """`python -m pickrank ARGS` with the tiny model, no cache and in-process decoding; its exit code, output and
    peak memory (os.wait4 reports the child's own rusage). Killed, and the test failed, after `timeout` s."""
    cmd = pickrank_cmd(*args, "--model", str(model_dir), "--no-cache", "--workers", "0")
    out, err = tmp_path / "cli.stdout", tmp_path / "cli.stderr"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, preexec_fn=preexec_fn)
        end = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > end:
                proc.kill()
                proc.wait()
                pytest.fail(f"pickrank {' '.join(args)}: still running after {timeout} s (it hangs)")
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    return Run(proc.returncode, out.read_bytes(), err.read_bytes(), usage.ru_maxrss * 1024)


def run_here(model_dir: Path, *args: str) -> Run:
    """`run_cli` in this process, where neither its memory, a hang nor its privileges are what is tested."""
    res = invoke(*args, "--model", str(model_dir), "--no-cache", "--workers", "0")
    return Run(res.returncode, res.stdout.encode(), res.stderr.encode(), None)
