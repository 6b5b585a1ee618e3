"""A real `pickrank serve` subprocess on a free loopback port, and requests to it in its three formats."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
from PIL import Image
from safetensors.numpy import save

from tests.support.commands import pickrank_cmd
from tests.support.images import draw_image

# fp32 scores of another batch composition (other prompts padded alongside, another GEMM shape) differ in their
# last bits: |diff| <= TOL + RTOL * |score| (for the tiny model's scores of about -36, one ulp is 3.8e-6; measured
# max 1.3e-5).
TOL, RTOL = 1e-5, 1e-6


LIMITS = ("--max-batch", "8", "--max-wait-ms", "30", "--max-images", "48", "--max-queue", "40",
          "--max-body-mb", "1", "--max-pixels", "100000")


@dataclass
class Server:
    """A `pickrank serve` subprocess: its URL, and its stderr as it comes."""

    proc: subprocess.Popen
    url: str
    stderr: list[str] = field(default_factory=list)

    def wait_ready(self, timeout: float = 90) -> None:
        """Poll /healthz until 200."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/healthz", timeout=5).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"server not ready in {timeout} s: {''.join(self.stderr)}")


@contextlib.contextmanager
def running_command(cmd: list[str], ready: str, env: dict | None = None) -> Iterator[tuple[subprocess.Popen, str,
                                                                                           list[str]]]:
    """Start a command that prints its URL on stderr on a line holding `ready`: (the process, the URL, its stderr
    lines as they come); always stopped at the end (SIGTERM, then SIGKILL) unless it has ended already."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            lines.append(line)
            if ready in line and "http://" in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not found.wait(90):
            raise AssertionError(f"no URL printed: {''.join(lines)}")
        line = next(text for text in lines if ready in text and "http://" in text)
        yield proc, re.search(r"http://[^\s/]+", line).group(0), lines  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextlib.contextmanager
def running_server(model_dir: Path, *args: str, env: dict | None = None, workers: int = 1) -> Iterator[Server]:
    """Start `pickrank serve --port 0` and read the URL it prints; always stopped (SIGTERM, then SIGKILL)."""
    cmd = pickrank_cmd("serve", "--model", str(model_dir), "--port", "0", "--workers", str(workers), *args)
    with running_command(cmd, "listening on", env) as (proc, url, lines):
        yield Server(proc, url, lines)


def group_gone(pgid: int, timeout: float = 10) -> bool:
    """Whether no process of the server's process group is left (decode workers included)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def as_json(prompts: str | list[str], files: list[Path], **extra: object) -> dict:
    key = "prompt" if isinstance(prompts, str) else "prompts"
    return {key: prompts, "images": [base64.b64encode(png_bytes(f)).decode() for f in files], **extra}


def post_json(url: str, prompts: str | list[str], files: list[Path], path: str = "/v1/score",
              headers: dict | None = None, **extra: object) -> httpx.Response:
    return httpx.post(url + path, json=as_json(prompts, files, **extra), timeout=60, headers=headers)


def post_form(url: str, prompts: str | list[str], files: list[Path], path: str = "/v1/score",
              headers: dict | None = None) -> httpx.Response:
    ps = [prompts] if isinstance(prompts, str) else prompts
    return httpx.post(url + path, data={"prompt": ps}, timeout=60, headers=headers,
                      files=[("image", (f.name, png_bytes(f), "image/png")) for f in files])


def safetensors_body(prompts: str | list[str], arrays: list[np.ndarray], **meta: str) -> bytes:
    key, value = ("prompt", prompts) if isinstance(prompts, str) else ("prompts", json.dumps(prompts))
    return save({f"images.{i}": a[None] for i, a in enumerate(arrays)}, metadata={key: value, **meta})


def post_st(url: str, prompts: str | list[str], files: list[Path], path: str = "/v1/score",
            headers: dict | None = None) -> httpx.Response:
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    return httpx.post(url + path, content=safetensors_body(prompts, arrays), timeout=60,
                      headers={"content-type": "application/x-safetensors", **(headers or {})})


POSTS = {"json": post_json, "multipart": post_form, "safetensors": post_st}


def drawn(tmp_path: Path, n: int, seed: int = 0) -> list[Path]:
    """n distinct PNGs of distinct sizes."""
    return [draw_image(tmp_path / f"s{seed}_{i}.png", (60 + 7 * i + seed % 13, 80 + 3 * i), seed=seed * 100 + i)
            for i in range(n)]


def scores_of(response: httpx.Response) -> list[float]:
    assert response.status_code == 200, response.text
    return response.json()["scores"]
