#!/usr/bin/env python
"""The reward server under large request bodies: how long the event loop stalls, and how much memory it takes.

    .venv/bin/python benchmarks/serve_bodies.py --model .bench/tiny-clip --bodies 6 --mb 240

`--bodies` clients each send one JSON body of about `--mb` MB at once (base64 of random bytes: it parses, and its
"images" then fail to decode, 422); meanwhile a prober asks GET /healthz every 20 ms. Reported: the answers the
large bodies got, the slowest /healthz answer while they were in flight (the event loop's longest stall, plus one
request's time), and the server's peak resident memory (VmHWM). Figures go to stdout; nothing is written to
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def start(model: str, workers: int) -> tuple[subprocess.Popen, str]:
    """`pickrank serve --port 0 --workers N`, ready (0: decoding in the server's own process, which VmHWM covers)."""
    cmd = [sys.executable, "-m", "pickrank", "serve", "--model", model, "--port", "0", "--workers", str(workers),
           "--quiet"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:  # type: ignore[union-attr]
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            url = found.group(1)
            break
    else:
        raise SystemExit(f"the server did not start (exit {proc.wait()})")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # type: ignore[union-attr]
    while httpx.get(url + "/healthz", timeout=30).status_code != 200:
        time.sleep(0.2)
    return proc, url


def peak_rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) / 1024  # type: ignore[union-attr]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--bodies", type=int, default=6)
    ap.add_argument("--mb", type=float, default=240.0)
    ap.add_argument("--workers", type=int, default=0, help="the server's decode processes")
    args = ap.parse_args()

    image = base64.b64encode(os.urandom(180_000)).decode()
    body = json.dumps({"prompt": "a", "images": [image] * int(args.mb * 1e6 / len(image))}).encode()
    proc, url = start(args.model, args.workers)
    rss_idle = peak_rss_mb(proc.pid)
    slowest, sending = 0.0, threading.Event()

    def probe() -> None:
        nonlocal slowest
        with httpx.Client(timeout=120) as http:
            while sending.is_set():
                t = time.perf_counter()
                http.get(url + "/healthz")
                slowest = max(slowest, time.perf_counter() - t)
                time.sleep(0.02)

    def send(_: int) -> int:
        return httpx.post(url + "/v1/score", content=body, headers={"content-type": "application/json"},
                          timeout=600).status_code

    try:
        sending.set()
        prober = threading.Thread(target=probe)
        prober.start()
        started = time.perf_counter()
        with ThreadPoolExecutor(args.bodies) as pool:
            statuses = Counter(pool.map(send, range(args.bodies)))
        wall = time.perf_counter() - started
        sending.clear()
        prober.join()
        rss_peak = peak_rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    print(f"{args.bodies} JSON bodies of {len(body) / 1e6:.0f} MB at once: answers {dict(statuses)} in {wall:.1f} s; "
          f"slowest /healthz meanwhile {1000 * slowest:.0f} ms; server peak RSS {rss_peak:.0f} MB "
          f"(idle {rss_idle:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
