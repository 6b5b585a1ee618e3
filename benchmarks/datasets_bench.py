"""Datasets (issue 26): webdataset shards against the same images as loose files, whole processes alternating.

    .venv/bin/python benchmarks/datasets_bench.py                   # the issue's sizes (20 x 1,000 JPEGs, ...)
    .venv/bin/python benchmarks/datasets_bench.py --scale 0.1       # a tenth of the images per shard
    .venv/bin/python benchmarks/datasets_bench.py --parts K,T,M,R,Y,P # some parts only

Parts: K the main process's reading alone (shards vs files, CPU per image), T throughput (shards vs files, tiny model), M peak RSS (4 vs 40 shards), R resume (a run killed half-way,
then the rerun, against a full run), Y `--engine ray` against local on the same shards (fixed cost and marginal
throughput), P PickScore's architecture on a few shards (time and scores against files). Shards are built from
bench.py's 512x512 JPEGs (the same bytes as the files), each sample a jpg, a txt caption and a json with a uid.
The section between the `bench:datasets` markers of BENCHMARKS.md is replaced with the figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402 - the harness: whole-process measurement, models, images
from bench import (  # noqa: E402,E501
    BENCH,
    PICKRANK,
    ROOT,
    child_env,
    ensure_images,
    ensure_model,
    image_folder,
    machine,
    measure,
    med,
    write_marked,
)

PROMPT = "a photo of a red cat sitting on a blue sofa in the sun"
PICKSCORE = Path(os.environ.get("PICKSCORE_ARCH", "/work/notes/models/pickscore"))


def build_shards(n_shards: int, per_shard: int) -> Path:
    """.bench/shards512-<n>x<per>/: webdataset shards of the first n * per 512x512 JPEGs (built once)."""
    folder = BENCH / f"shards512-{n_shards}x{per_shard}"
    if (folder / f"{n_shards - 1:05d}.tar").exists():
        return folder
    images = ensure_images(512, n_shards * per_shard)
    tmp = folder.with_suffix(".build")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for s in range(n_shards):
        with tarfile.open(tmp / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                n = s * per_shard + i
                key = f"{n:09d}"
                for ext, data in (("jpg", (ROOT / images[n]).read_bytes()), ("txt", PROMPT.encode()),
                                  ("json", json.dumps({"uid": f"{n:032x}", "key": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def score_cmd(model: Path, inputs: list[str], out: str, *opts: str) -> list[str]:
    return [*PICKRANK, "score", *inputs, "-p", PROMPT, "--model", str(model), "-q", "-o", out, *opts]


def fresh(path: Path) -> str:
    """An output folder emptied for a run (a kept one would be skipped as done), as -o DIR/."""
    shutil.rmtree(path, ignore_errors=True)
    return f"{path}/"


def part_throughput(tiny: Path, n_shards: int, per: int, rounds: int) -> list[str]:
    shards, files = build_shards(n_shards, per), image_folder(512, n_shards * per)
    cmds = {"shards": score_cmd(tiny, [str(shards)], f"{BENCH / 'ds-T'}/", "--no-cache"),
            "files": score_cmd(tiny, [files], str(BENCH / "ds-T.jsonl"), "--no-cache"),
            "shards, --prompt-from caption": [c for c in score_cmd(tiny, [str(shards)], f"{BENCH / 'ds-T'}/",
                                                                   "--no-cache", "--prompt-from", "caption")
                                              if c not in ("-p", PROMPT)]}
    runs: dict[str, list] = {k: [] for k in cmds}
    for r in range(rounds):
        for kind in (list(cmds) if r % 2 == 0 else list(reversed(cmds))):
            fresh(BENCH / "ds-T")
            runs[kind].append(measure(f"{kind} {n_shards}x{per}", cmds[kind]))
    n = n_shards * per
    rate = {k: n / med(v) for k, v in runs.items()}
    return [f"### Throughput: {n_shards} shards x {per:,} JPEGs 512x512 against the same {n:,} files (tiny model, "
            "one prompt; alternating rounds)",
            "", "| run | wall s (each round) | images/s | CPU s | peak RSS MB (tree) |", "|---|---|---|---|---|",
            *[f"| {k} | {', '.join(f'{r.wall:.1f}' for r in v)} | {rate[k]:.0f} | {med(v, 'tree_cpu'):.1f} | "
              f"{med(v, 'tree_rss_mb'):.0f} |" for k, v in runs.items()], "",
            f"- **shards / files throughput: {rate['shards'] / rate['files']:.2f}x** (target >= 1.2x, at least "
            "as fast)",
            *[f"- command ({k}): `{' '.join(c)}`" for k, c in cmds.items()], ""]


def part_memory(tiny: Path, per: int) -> list[str]:
    rows, peaks = [], {}
    for n in (4, 40):
        run = measure(f"shards {n}x{per}", score_cmd(tiny, [str(build_shards(n, per))], fresh(BENCH / "ds-M"),
                                                     "--no-cache"))
        peaks[n] = run
        rows.append(f"| {n} x {per:,} | {run.wall:.1f} | {run.maxrss_mb:.0f} | {run.tree_rss_mb:.0f} |")
    grow = lambda a: 100 * (getattr(peaks[40], a) / getattr(peaks[4], a) - 1)  # noqa: E731
    return [f"### Peak RSS: 40 shards against 4 (x {per:,} JPEGs each, tiny model, -o DIR/)", "",
            "| shards | wall s | peak RSS MB (maxrss) | peak RSS MB (tree) |", "|---|---|---|---|", *rows, "",
            f"- **40 vs 4 shards: {grow('maxrss_mb'):+.1f}% (largest process), {grow('tree_rss_mb'):+.1f}% (process "
            "tree)** (target within 10%)", ""]


def _kill_half_way(cmd: list[str], out: Path, n_shards: int) -> float:
    """Run cmd, SIGTERM it once half the shards' outputs exist; the seconds it ran."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while p.poll() is None and len(list(out.glob("*.parquet"))) < n_shards // 2:
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=120)
    finally:
        p.kill()
    return time.perf_counter() - t0


def part_resume(tiny: Path, n_shards: int, per: int) -> list[str]:
    shards = str(build_shards(n_shards, per))
    caches = {k: BENCH / f"ds-R-{k}.sqlite3" for k in ("full", "kill")}
    for c in caches.values():
        c.unlink(missing_ok=True)
    full = measure("full run", score_cmd(tiny, [shards], fresh(BENCH / "ds-R-full"), "--cache", str(caches["full"])))
    killed_at = _kill_half_way(score_cmd(tiny, [shards], fresh(BENCH / "ds-R"), "--cache", str(caches["kill"])),
                               BENCH / "ds-R", n_shards)
    done = len(list((BENCH / "ds-R").glob("*.parquet")))
    with sqlite3.connect(caches["kill"]) as db:
        cached = db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]
    cmd = [c for c in score_cmd(tiny, [shards], f"{BENCH / 'ds-R'}/", "--cache", str(caches["kill"])) if c != "-q"]
    rerun = measure("rerun after the kill", cmd)
    err = (BENCH / "last-stderr.txt").read_text()
    m = re.search(r"(\d+) image\(s\), (\d+) embedded, (\d+) from cache", err)
    images, embedded, hits = (int(x) for x in m.groups()) if m else (0, 0, 0)
    total = n_shards * per
    return [f"### Resume: {n_shards} shards x {per:,}, a run killed (SIGTERM) half-way, then the rerun (tiny model)",
            "", "| run | wall s |", "|---|---|", f"| full run, empty cache | {full.wall:.1f} |",
            f"| killed run (SIGTERM once {n_shards // 2} shard outputs existed) | {killed_at:.1f} |",
            f"| rerun | {rerun.wall:.1f} |", "",
            f"- **rerun / full run: {rerun.wall / full.wall:.2f}** (target under 0.55)",
            f"- the killed run left {done} finished shard outputs and {cached:,} cached embeddings; the rerun "
            f"skipped those {done} shards, read {images:,} images, embedded {embedded:,} and took {hits:,} from the "
            f"cache: {cached + embedded:,} embeddings for {total:,} images, **each embedded once**: "
            f"{cached + embedded == total}", ""]


def part_ray(tiny: Path, per: int) -> list[str]:
    sizes = (2, 8)
    runs = {}
    for n in sizes:
        shards = str(build_shards(n, per))
        for engine in ("local", "ray"):
            extra = ["--engine", engine, "--no-cache"] + (["--ray-actors", "1"] if engine == "ray" else [])
            runs[(n, engine)] = measure(f"{engine} {n}x{per}", score_cmd(tiny, [shards], fresh(BENCH / "ds-Y"), *extra))
    rows, lines = [], []
    for engine in ("local", "ray"):
        a, b = runs[(sizes[0], engine)].wall, runs[(sizes[1], engine)].wall
        rate = (sizes[1] - sizes[0]) * per / (b - a) if b > a else float("inf")
        fixed = a - sizes[0] * per / rate
        rows.append(f"| {engine} | {a:.1f} | {b:.1f} | {rate:.0f} | {fixed:.1f} |")
    return [f"### `--engine ray` against local on the same shards ({sizes[0]} and {sizes[1]} shards x {per:,}, tiny "
            "model, 1 Ray actor)", "",
            f"| engine | wall s, {sizes[0]} shards | wall s, {sizes[1]} shards | marginal images/s | fixed s |",
            "|---|---|---|---|---|", *rows, "",
            "- fixed cost = the small run's time less its images at the marginal rate (start-up, Ray, the first "
            "and last shard)", *lines, ""]


def _read_all(kind: str, shards: Path, files: str) -> int:
    """Read (and hash, as the engine does) every image of the shards or of the files, in this process: the reading
    alone, without decoding or a model."""
    from pickrank.inputs.datasets.webdataset import tar_samples
    from pickrank.inputs.files import content_key, read_bytes
    from pickrank.options import DatasetOptions

    n = 0
    if kind == "shards":
        for shard in sorted(shards.glob("*.tar")):
            for sample in tar_samples(str(shard), DatasetOptions(), None):
                content_key(sample.image or b"")
                n += 1
    else:
        for path in sorted((ROOT / files).iterdir()):
            content_key(read_bytes(str(path), None))
            n += 1
    return n


def part_reading(n_shards: int, per: int, rounds: int = 5) -> list[str]:
    """The main process's reading cost per image: shards (tar headers parsed in Python) against files (one open
    each), CPU seconds in this process, the median of alternating rounds after one warm-up of each."""
    shards, files = build_shards(n_shards, per), image_folder(512, n_shards * per)
    cpu: dict[str, list[float]] = {"shards": [], "files": []}
    for r in range(rounds + 1):
        for kind in (("shards", "files") if r % 2 == 0 else ("files", "shards")):
            t = time.process_time()
            n = _read_all(kind, shards, files)
            if r:
                cpu[kind].append(time.process_time() - t)
    us = {k: 1e6 * statistics.median(v) / n for k, v in cpu.items()}
    return [f"### Reading alone: {n_shards} shards x {per:,} against the same {n:,} files (read and hashed in one "
            "process, no decoding)", "", "| input | CPU us per image (median) |", "|---|---|",
            *[f"| {k} | {v:.0f} |" for k, v in us.items()], ""]


def _scores(path: Path) -> dict[str, float]:
    import pyarrow.parquet as pq

    if path.is_dir():
        rows = [r for p in sorted(path.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
        return {r["key"]: r["score"] for r in rows}
    return {Path(r["path"]).stem: r["score"] for r in map(json.loads, path.read_text().splitlines())}


def part_pickscore(n_shards: int, per: int) -> list[str]:
    model = PICKSCORE if (PICKSCORE / "model.safetensors").exists() else ensure_model("pickscore-arch")
    shards, files = build_shards(n_shards, per), image_folder(512, n_shards * per)
    s = measure("shards, PickScore arch", score_cmd(model, [str(shards)], fresh(BENCH / "ds-P"), "--no-cache"))
    f = measure("files, PickScore arch", score_cmd(model, [files], str(BENCH / "ds-P.jsonl"), "--no-cache"))
    a, b = _scores(BENCH / "ds-P"), _scores(BENCH / "ds-P.jsonl")
    diff = max(abs(a[k] - b[f"{int(k):05d}"]) for k in a)  # shard keys are the files' numbers
    n = n_shards * per
    return [f"### PickScore's architecture: {n_shards} shards x {per} JPEGs 512x512 against the same files", "",
            "| run | wall s | s/image | peak RSS MB (tree) |", "|---|---|---|---|",
            f"| shards | {s.wall:.1f} | {s.wall / n:.2f} | {s.tree_rss_mb:.0f} |",
            f"| files | {f.wall:.1f} | {f.wall / n:.2f} | {f.tree_rss_mb:.0f} |", "",
            f"- shards / files time: {s.wall / f.wall:.2f}; **max score difference shards vs files: {diff:.1e}** "
            "(target <= 1e-5)", ""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="K,T,M,R,Y,P")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the issue's images per shard")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of part T")
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    per = max(1, round(1000 * args.scale))
    BENCH.mkdir(exist_ok=True)
    tiny = ensure_model("tiny-clip")
    mach = machine()
    started, t0 = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    body = ["## Datasets: webdataset shards (issue 26)", "",
            f"- command: `{' '.join(['.venv/bin/python', 'benchmarks/datasets_bench.py', *sys.argv[1:]])}`",
            f"- machine: {mach['cpu']}, {mach['cores']} cores, {mach['mem_gib']} GiB RAM; Python {mach['python']}, "
            f"torch {mach['torch']}, Pillow {mach['pillow']}; 1-min load average at start {mach['load'][0]:.2f}",
            f"- date: {started:%Y-%m-%d %H:%M} UTC (system clock)", ""]
    n_before = len(bench.ALL_RUNS)
    builders = {"K": lambda: part_reading(20, per), "T": lambda: part_throughput(tiny, 20, per, args.rounds), "M": lambda: part_memory(tiny, per),
                "R": lambda: part_resume(tiny, 20, per), "Y": lambda: part_ray(tiny, per),
                "P": lambda: part_pickscore(2, 4)}
    for name in "KTMRYP":
        if name in parts:
            print(f"\n== part {name}", flush=True)
            body += builders[name]()
    loads = [r.other_load for r in bench.ALL_RUNS[n_before:]] or [0.0]
    body += [f"- machine noise: other processes used a median {statistics.median(loads):.2f} cores (max "
             f"{max(loads):.2f}) of the {mach['cores']} while these ran; the whole took "
             f"{(time.perf_counter() - t0) / 60:.1f} min"]
    print("\n".join(body))
    if not args.no_report:
        write_marked("datasets", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
