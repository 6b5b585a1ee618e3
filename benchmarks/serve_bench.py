#!/usr/bin/env python
"""The reward server's benchmark: concurrent clients against `pickrank serve` on loopback.

    .venv/bin/python benchmarks/serve_bench.py --model .bench/tiny-clip --clients 32 --images 4 --rounds 3
    .venv/bin/python benchmarks/serve_bench.py --model .bench/pickscore-arch --clients 8 --images 2 --rounds 2

Each client sends its own 512x512 images (distinct per client), `--rounds` requests each, as PNGs in JSON (base64)
and as uint8 pixels in a safetensors body. Reported per format: images per second through the server, the same
for in-process `PickScorer.score` on batches of --max-batch images of the same data (PNG bytes, or the uint8
arrays) in the same run, their ratio, the mean batch size the server reached (from /metrics), p50/p99 request
latency, and the largest |server - in-process| score difference. `--engine ray` benchmarks the Ray Serve
deployment instead. Figures go to stdout (and --json FILE); nothing is written to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent


def make_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """n distinct deterministic RGB images: smooth noise plus a few shapes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
        d = ImageDraw.Draw(im)
        for _ in range(5):
            x0, y0 = (int(v) for v in rng.integers(0, size, 2))
            d.ellipse([x0, y0, x0 + int(rng.integers(10, size // 2)), y0 + int(rng.integers(10, size // 2))],
                      fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        out.append(np.asarray(im))
    return out


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def in_process(model: str, prompt: str, pngs: list[bytes], arrays: list[np.ndarray], batch: int,
               device: str) -> tuple[dict[str, float], np.ndarray]:
    """In-process PickScorer.score on batches of `batch` images: images/s from PNG bytes and from uint8 arrays
    (after one warm-up batch), and the scores."""
    sys.path.insert(0, str(ROOT))
    from pickrank.api import PickScorer

    scorer = PickScorer.from_pretrained(model, device=device, batch_size=batch)
    scorer.score(prompt, arrays[:batch])  # warm-up: the vision tower loads on first use
    rates, scores = {}, None
    for name, data in (("json", pngs), ("safetensors", arrays)):
        started = time.perf_counter()
        parts = [scorer.score(prompt, data[i:i + batch]) for i in range(0, len(data), batch)]
        rates[name] = len(data) / (time.perf_counter() - started)
        scores = np.concatenate([p.numpy() for p in parts])
    return rates, scores  # type: ignore[return-value]


@contextlib.contextmanager
def server(model: str, engine: str, max_batch: int, max_wait_ms: float, device: str,
           workers: int | None) -> Iterator[str]:
    """`pickrank serve --port 0` in a subprocess, ready; its URL. Stopped with SIGTERM."""
    cmd = [sys.executable, "-m", "pickrank", "serve", "--model", model, "--port", "0", "--engine", engine,
           "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--device", device,
           "--max-queue", "100000", "--quiet"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        for line in proc.stderr:  # type: ignore[union-attr]
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        if url is None:
            raise SystemExit(f"the server did not start (exit {proc.wait()})")
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # type: ignore[union-attr]
        while httpx.get(url + "/healthz", timeout=30).status_code != 200:
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


def batch_stats(url: str) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram."""
    text = httpx.get(url + "/metrics", timeout=30).text
    get = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # noqa: E731
    return get("pickrank_batch_size_sum"), get("pickrank_batch_size_count")


def request_bodies(fmt: str, prompt: str, pngs: list[bytes], arrays: list[np.ndarray]) -> tuple[bytes, dict]:
    """One request's body and headers in the format."""
    if fmt == "json":
        doc = {"prompt": prompt, "images": [base64.b64encode(b).decode() for b in pngs]}
        return json.dumps(doc).encode(), {"content-type": "application/json"}
    from safetensors.numpy import save

    return save({"images": np.stack(arrays)}, metadata={"prompt": prompt}), \
        {"content-type": "application/x-safetensors"}


def load(url: str, fmt: str, prompt: str, pngs: list[bytes], arrays: list[np.ndarray], clients: int, k: int,
         rounds: int) -> dict:
    """Every client sends `rounds` requests of its own k images at once; images/s, latencies, batch size, scores."""
    bodies = [request_bodies(fmt, prompt, pngs[c * k:(c + 1) * k], arrays[c * k:(c + 1) * k])
              for c in range(clients)]
    latencies: list[float] = []
    scores: list[list[float]] = [[] for _ in range(clients)]
    before = batch_stats(url)

    def client(c: int) -> None:
        body, headers = bodies[c]
        with httpx.Client(timeout=600) as http:
            for _ in range(rounds):
                t = time.perf_counter()
                r = http.post(url + "/v1/score", content=body, headers=headers)
                latencies.append(time.perf_counter() - t)
                r.raise_for_status()
                scores[c] = r.json()["scores"]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - started
    after = batch_stats(url)
    lat = sorted(latencies)
    return {"images_per_s": clients * k * rounds / wall, "wall_s": wall,
            "mean_batch": (after[0] - before[0]) / max(1.0, after[1] - before[1]),
            "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "scores": [s for c in scores for s in c]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model folder (python -m pickrank.devtools DIR [tiny|pickscore])")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--images", type=int, default=4, help="images per request")
    ap.add_argument("--rounds", type=int, default=3, help="requests per client and format")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--engine", choices=["local", "ray"], default="local")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=None, help="the server's decode workers")
    ap.add_argument("--formats", default="json,safetensors")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args()

    n = args.clients * args.images
    arrays = make_images(n, args.size)
    pngs = [png(a) for a in arrays]
    prompt = "a photo of a red cat on a blue sofa"
    base, expected = in_process(args.model, prompt, pngs, arrays, args.max_batch, args.device)
    report = {"settings": vars(args), "in_process_images_per_s": base, "formats": {}}
    with server(args.model, args.engine, args.max_batch, args.max_wait_ms, args.device, args.workers) as url:
        report["server_cpu_threads"] = httpx.get(url + "/v1/info", timeout=30).json().get("cpu_threads")
        for fmt in args.formats.split(","):
            load(url, fmt, prompt, pngs, arrays, min(args.clients, 4), args.images, 1)  # warm-up
            r = load(url, fmt, prompt, pngs, arrays, args.clients, args.images, args.rounds)
            r["max_abs_diff"] = float(np.abs(np.array(r.pop("scores")) - expected).max())
            r["ratio"] = r["images_per_s"] / base[fmt]
            report["formats"][fmt] = r
    print(f"{args.engine} server, {args.clients} clients x {args.images} images x {args.rounds} rounds, "
          f"{args.size}x{args.size}, --max-batch {args.max_batch}, --max-wait-ms {args.max_wait_ms:g}, "
          f"model {args.model}, the server's model calls on {report['server_cpu_threads']} CPU thread(s)")
    print(f"{'format':<12} {'server img/s':>12} {'in-proc img/s':>13} {'ratio':>6} {'mean batch':>10} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'max |diff|':>10}")
    for fmt, r in report["formats"].items():
        print(f"{fmt:<12} {r['images_per_s']:>12.1f} {base[fmt]:>13.1f} {r['ratio']:>6.2f} {r['mean_batch']:>10.1f} "
              f"{r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f} {r['max_abs_diff']:>10.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
