"""Running the real CLI (in process and as a subprocess) and reading what it says."""

from __future__ import annotations

import csv
import io
import json
import struct
import sys
import traceback
import zlib
from dataclasses import dataclass

from typer.testing import CliRunner

from pickrank.cli.app import app

PROMPT = "a red cat on a blue sofa"


def cli(runner, model_dir, *args, input: str | None = None, workers: int = 0):
    """The real CLI in process, with the tiny model, no cache and in-process decoding unless asked."""
    return runner.invoke(app, [*args, "--model", str(model_dir), "--no-cache", "--workers", str(workers)],
                         input=input)


@dataclass(frozen=True)
class Completed:
    """What a `python -m pickrank` run gives, as `subprocess.CompletedProcess` has it."""

    returncode: int
    stdout: str
    stderr: str


def invoke(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> Completed:
    """`python -m pickrank ARGS` run in this process: a new interpreter costs seconds of CPU importing torch, so a
    subprocess is for what needs one (a signal, a pipe, a terminal, memory, privileges, settings read at import).
    `env` is set for the run only. An exception that escapes the CLI is on stderr as its traceback, as the
    interpreter would print it."""
    res = CliRunner().invoke(app, list(args), env=env, input=input)
    err = res.stderr
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        err += "".join(traceback.format_exception(res.exception))
    return Completed(res.exit_code, res.stdout, err)


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def parse(fmt: str, text: str) -> list[dict]:
    if fmt == "json":
        return json.loads(text)
    if fmt == "jsonl":
        return jsonl(text)
    rows = list(csv.DictReader(io.StringIO(text)))
    return [{k: (v or None) for k, v in r.items()} for r in rows]


def pickrank_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pickrank", *args]


def no_traceback(stderr: str) -> None:
    for bad in ("Traceback", "BrokenPipe", "Exception ignored", "KeyboardInterrupt"):
        assert bad not in stderr, stderr


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def drop_file_access_override() -> None:
    """In the child, before exec: remove CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so the
    root process exec'd next gets neither and file modes apply to it (it stays uid 0, so it can still run the
    venv's Python under /root)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
