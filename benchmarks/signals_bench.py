#!/usr/bin/env python
"""What the signals cost (`compare --signals`, `serve --signals`), whole processes, alternating rounds.

    .venv/bin/python benchmarks/signals_bench.py --model .bench/tiny-clip --images 2000 --rounds 3

compare: two systems of --images/2 JPEGs 512x512 each (one per prompt, a prompts CSV), `pickrank compare A B
--prompts CSV --no-cache -f json` without and with `--signals`, alternating (which goes first alternates each
round too); wall and CPU seconds of the process tree (os.wait4), the median of each, and the ratio. serve: one
client sending --requests requests of 4 PNGs 512x512 (JSON, base64) to `pickrank serve` without and with
`--signals`, in turn; p50 and p90 latency.
Figures go to stdout; nothing is written to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import base64
import csv
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import make_images, png, server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def make_systems(folder: Path, images: int) -> Path:
    """folder/a and folder/b with images/2 JPEGs each (ids 0..), and folder/prompts.csv; made once."""
    csv_path = folder / "prompts.csv"
    if csv_path.exists():
        return csv_path
    per = images // 2
    for name, seed in (("a", 1), ("b", 2)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for start in range(0, per, 100):
            for i, arr in enumerate(make_images(min(100, per - start), 512, seed=seed * 100_000 + start)):
                Image.fromarray(arr).save(folder / name / f"{start + i}.jpg", quality=90)
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt"])
        w.writerows([[i, f"a picture, number {i}"] for i in range(per)])
    return csv_path


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds (the process and its children) of one run."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
    return wall, usage.ru_utime + usage.ru_stime


def bench_compare(args: argparse.Namespace) -> None:
    folder = Path(args.data)
    prompts = make_systems(folder, args.images)
    base = [sys.executable, "-m", "pickrank", "compare", str(folder / "a"), str(folder / "b"), "--prompts",
            str(prompts), "--model", args.model, "--no-cache", "-q", "-f", "json", "-o", str(folder / "out.json")]
    runs: dict[str, list[tuple[float, float]]] = {"without": [], "with --signals": []}
    for r in range(args.rounds):  # which goes first alternates too: neither always follows the other
        for name in (("without", "with --signals") if r % 2 == 0 else ("with --signals", "without")):
            runs[name].append(timed(base + (["--signals"] if name != "without" else [])))
    medians = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()}
    print(f"compare, {args.images} images (2 systems x {args.images // 2} prompts), {args.rounds} rounds")
    for k, v in runs.items():
        print(f"  {k:15s} wall {', '.join(f'{w:.1f}' for w, _ in v)} s (median {medians[k][0]:.1f}); "
              f"CPU median {medians[k][1]:.1f} s")
    print(f"  ratio with/without: wall {medians['with --signals'][0] / medians['without'][0]:.3f}, "
          f"CPU {medians['with --signals'][1] / medians['without'][1]:.3f}")


def latencies(url: str, body: dict, n: int) -> list[float]:
    out = []
    with httpx.Client(timeout=120) as client:
        client.post(url + "/v1/score", json=body).raise_for_status()  # warm-up
        for _ in range(n):
            start = time.perf_counter()
            client.post(url + "/v1/score", json=body).raise_for_status()
            out.append(time.perf_counter() - start)
    return out


def bench_serve(args: argparse.Namespace) -> None:
    body = {"prompt": "a picture", "images": [base64.b64encode(png(a)).decode() for a in make_images(4, 512, 7)]}
    got: dict[str, list[float]] = {"without": [], "with --signals": []}
    for _ in range(args.rounds):
        for name, extra in (("without", ()), ("with --signals", ("--signals",))):
            with server(args.model, "local", 8, 5.0, "cpu", args.workers, extra) as url:
                got[name] += latencies(url, body, args.requests)
    print(f"serve, 1 client, {args.requests} requests x 4 PNGs 512x512 per round, {args.rounds} rounds")
    for name, vals in got.items():
        q = statistics.quantiles(vals, n=10)
        print(f"  {name:15s} p50 {statistics.median(vals) * 1000:.1f} ms, p90 {q[8] * 1000:.1f} ms")
    ratio = statistics.median(got["with --signals"]) / statistics.median(got["without"])
    print(f"  p50 ratio with/without: {ratio:.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--data", default=str(ROOT / ".bench" / "signals"))
    ap.add_argument("--only", choices=("compare", "serve"), default=None)
    args = ap.parse_args()
    if args.only in (None, "compare"):
        bench_compare(args)
    if args.only in (None, "serve"):
        bench_serve(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
