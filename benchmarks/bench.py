#!/usr/bin/env python
"""pickrank's end-to-end benchmark and embedding-cache figure.

    .venv/bin/python benchmarks/bench.py [--quick] [--cases 1,2,3,4]

Every measured run is a whole process (imports and model loading included), started with subprocess; pickrank
and its baseline run alternately in the same invocation, several times, and the report gives medians and the
ratios of medians (plus per-round ratios). Peak memory: ru_maxrss from os.wait4 (the largest single process:
the child or any descendant it reaped) and the sum of RSS over the child's process tree, sampled every 0.25 s.
CPU time is the whole tree's (decode workers included); "other load" is how many cores processes outside the run
used meanwhile (/proc/stat), so a report says when the machine was too busy for its timings to mean much.

Models and images are built once into .bench/ (gitignored) and reused:
  .bench/pickscore-arch  PickScore_v1's architecture (CLIP ViT-H/14) with random weights: same compute, ~4 GB
  .bench/tiny-clip       the tests' tiny random CLIP
  .bench/img1024         deterministic 1024x1024 JPEGs (noise + shapes), .bench/img512 512x512 ones
Results go to the console and to BENCHMARKS.md (one section per case, replaced when that case is re-run) and,
raw, to .bench/results-caseN.json.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
HERE = Path(__file__).resolve().parent
REPORT = ROOT / "BENCHMARKS.md"
PY = sys.executable
_PICKRANK_BIN = Path(sys.executable).parent / "pickrank"
PICKRANK = [str(_PICKRANK_BIN)] if _PICKRANK_BIN.exists() else [PY, "-m", "pickrank"]

PROMPTS = [
    "a photo of a red cat sitting on a blue sofa in the sun",
    "a painting of a mountain lake at sunset with green trees and a small boat",
    "an astronaut riding a horse on the moon, digital art, highly detailed",
    "a bowl of fruit with apples oranges and bananas on a wooden table",
    "a city street at night with neon lights and rain, cinematic",
    "portrait of an old man with a white beard, oil painting",
    "a yellow circle, a square and a triangle under the sky",
    "a house by the sea with a dog and a flower garden",
]

# What each case is measured with: full run, and --quick (marked as such in BENCHMARKS.md).
SIZES = {
    "full": dict(c1_images=16, c1_rounds=3, c2_images=16, c2_prompts=8, c2_baseline_rounds=1,
                 c3_sets=(2000, 8000), c3_rounds=(3, 2), c3_ref_small=500, c4_images=32, c4_warm_runs=3),
    "quick": dict(c1_images=4, c1_rounds=1, c2_images=4, c2_prompts=4, c2_baseline_rounds=1,
                  c3_sets=(200, 800), c3_rounds=(1, 1), c3_ref_small=100, c4_images=4, c4_warm_runs=2),
}
TARGETS = {
    "c1_fp32": "pickrank fp32 time / baseline time <= 1.05",
    "c1_bf16": "baseline fp32 time / pickrank bf16 time >= 1.7",
    "c2": "baseline (once per prompt) time / pickrank batch time >= 5",
    "c3_tput": "pickrank images/s / single-process decode loop images/s >= 1.6",
    "c3_rss": "pickrank peak RSS on the large set within 10% of the small set",
    "c4": "cold-cache run / warm-cache run (new prompt) >= 10, and warm scores == --no-cache scores",
}


# ---------------------------------------------------------------------------------------------------------------
# Measuring one process


@dataclass
class Run:
    """One whole-process run: wall time, CPU time, peak memory."""

    label: str
    wall: float
    user: float
    sys: float
    maxrss_mb: float  # ru_maxrss of the child (largest single process among it and the descendants it reaped)
    tree_rss_mb: float  # peak of the summed RSS over the process tree, sampled
    rc: int
    tree_cpu: float = 0.0  # CPU seconds of the whole process tree (decode workers included), estimated
    other_load: float = 0.0  # cores used by processes outside this run while it ran (machine noise)
    extra: dict = field(default_factory=dict)


_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICK = os.sysconf("SC_CLK_TCK")
ALL_RUNS: list[Run] = []  # every measured run of this invocation, for the per-case noise line


def _tree_sample(root: int, cpu_ticks: dict[int, int]) -> int:
    """Summed RSS of `root` and all its descendants (scans /proc: no psutil); records each one's CPU ticks."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            ppid, ticks[int(d)] = int(fields[1]), int(fields[11]) + int(fields[12])  # ppid, utime + stime
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            pass
        if pid in ticks:
            cpu_ticks[pid] = max(cpu_ticks.get(pid, 0), ticks[pid])
        stack.extend(children.get(pid, ()))
    return total


def _busy_ticks() -> int:
    """CPU ticks spent busy on the whole machine so far (all cores; /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v[:8]) - v[3] - v[4]  # minus idle and iowait


def measure(label: str, cmd: list[str], stdout: Path | None = None, env: dict | None = None,
            interval: float = 0.25) -> Run:
    """Run cmd to completion; fail loudly (with its stderr) when it fails."""
    err_path = BENCH / "last-stderr.txt"
    out_f = open(stdout, "wb") if stdout else open(os.devnull, "wb")
    with out_f, open(err_path, "wb") as err_f:
        busy0 = _busy_ticks()
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, cwd=ROOT, env=env or child_env())
        peak = [0]
        cpu_ticks: dict[int, int] = {}
        done = threading.Event()

        def sample() -> None:
            while not done.wait(interval):
                peak[0] = max(peak[0], _tree_sample(p.pid, cpu_ticks))

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            _, status, ru = os.wait4(p.pid, 0)
        except BaseException:  # Ctrl-C: do not leave a benchmark process running behind us
            p.kill()
            p.wait()
            raise
        wall = time.perf_counter() - t0
        busy = (_busy_ticks() - busy0) / _TICK
        done.set()
        th.join()
        p.returncode = os.waitstatus_to_exitcode(status)
    rc = p.returncode
    if rc != 0:
        tail = err_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"\n{label}: exit code {rc}\n$ {shlex.join(cmd)[:2000]}\n{tail}")
    # Our CPU: the child and what it reaped (rusage) plus what the sampler saw its descendants use (decode workers
    # are children of the forkserver, which the child does not reap, so rusage misses them).
    own = ru.ru_utime + ru.ru_stime
    tree_cpu = max(own, own - cpu_ticks.get(p.pid, 0) / _TICK + sum(cpu_ticks.values()) / _TICK)
    other = max(0.0, busy - tree_cpu) / wall
    run = Run(label, wall, ru.ru_utime, ru.ru_stime, ru.ru_maxrss / 1024, max(peak[0], ru.ru_maxrss * 1024) / 2**20, rc,
              tree_cpu=tree_cpu, other_load=other)
    ALL_RUNS.append(run)
    print(f"  {label:<34} {wall:8.2f} s  cpu {tree_cpu:7.1f} s  maxrss {run.maxrss_mb:6.0f} MB  "
          f"tree {run.tree_rss_mb:6.0f} MB  other load {other:4.2f} cores", flush=True)
    return run


def child_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    for k in ("PICKRANK_CACHE", "PICKRANK_MODEL"):
        env.pop(k, None)
    return env


def med(runs: list[Run], attr: str = "wall") -> float:
    return statistics.median(getattr(r, attr) for r in runs)


# ---------------------------------------------------------------------------------------------------------------
# Inputs: models and images


def ensure_model(name: str) -> Path:
    """Build .bench/<name> once (in a subprocess, so its memory is returned); tmp folder + rename = never partial."""
    folder = BENCH / name
    if (folder / "preprocessor_config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    tmp = BENCH / f"{name}.build"
    shutil.rmtree(tmp, ignore_errors=True)
    arch = "pickscore" if name == "pickscore-arch" else "tiny"
    print(f"building {folder} ({arch}; the PickScore architecture is ~4 GB, about a minute)...", flush=True)
    subprocess.run([PY, "-m", "pickrank.devtools", str(tmp)] + (["pickscore"] if arch == "pickscore" else []),
                   check=True, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _make_jpeg(args: tuple[str, int, int]) -> None:
    """A deterministic picture: a smooth random colour field, 8 shapes, and sensor-like noise; JPEG quality 90."""
    import numpy as np
    from PIL import Image, ImageDraw

    path, size, seed = args
    rng = np.random.default_rng(seed)
    w = h = size
    im = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    d = ImageDraw.Draw(im)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(w // 16, w // 2)), y0 + int(rng.integers(h // 16, h // 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (d.ellipse if rng.integers(0, 2) else d.rectangle)([x0, y0, x1, y1], fill=colour)
    a = np.asarray(im, dtype=np.float32) + rng.normal(0, 8, (h, w, 3)).astype(np.float32)
    out = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=90)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)


def ensure_images(size: int, n: int) -> list[str]:
    """The first n images of .bench/img<size>/ (generated as needed), as paths relative to the repo root."""
    folder = BENCH / f"img{size}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(folder / f"{i:05d}.jpg") for i in range(n)]
    missing = [(p, size, size * 100_003 + i) for i, p in enumerate(paths) if not os.path.exists(p)]
    if missing:
        print(f"generating {len(missing)} JPEGs of {size}x{size} in {folder}...", flush=True)
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
            pool.map(_make_jpeg, missing, chunksize=32)
    return [os.path.relpath(p, ROOT) for p in paths]


def image_folder(size: int, n: int) -> str:
    """A folder holding exactly the first n images of img<size> (hard links), relative to the repo root."""
    src = ensure_images(size, n)
    folder = BENCH / f"img{size}-{n}"
    if not folder.is_dir() or len(os.listdir(folder)) != n:
        shutil.rmtree(folder, ignore_errors=True)
        tmp = BENCH / f"img{size}-{n}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for p in src:
            os.link(ROOT / p, tmp / os.path.basename(p))
        tmp.rename(folder)
    return os.path.relpath(folder, ROOT)


def warm_up(model: Path, images: list[str]) -> None:
    """Untimed: read the model and images into the page cache and import the libraries once, so that neither
    the first measured run nor whichever command happens to go first pays for a cold disk."""
    for p in [*model.iterdir(), *(ROOT / i for i in images)]:
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass
    subprocess.run([PY, "-c", "import torch, transformers, PIL, numpy, pickrank.cli.app; "
                    "from transformers import AutoProcessor, CLIPModel"], cwd=ROOT, env=child_env(), check=True)


# ---------------------------------------------------------------------------------------------------------------
# Commands


def pickrank_score(model: Path, prompt: str, images: list[str], out: Path, *opts: str) -> list[str]:
    return PICKRANK + ["score", "--prompt", prompt, "--model", str(model), *opts, "-q", "-f", "jsonl",
                       "-o", str(out), *images]


def reference(model: Path, prompt: str, images: list[str], out: Path) -> list[str]:
    return [PY, str(HERE / "reference.py"), "--prompt", prompt, str(model), *images, "-o", str(out)]


def read_scores(path: Path) -> dict[tuple[str, str], float]:
    """(prompt, path) -> score, from pickrank's or reference.py's JSON lines."""
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("error"):
            raise SystemExit(f"{path}: error record {r}")
        out[(r["prompt"], os.path.normpath(r["path"]))] = float(r["score"])
    return out


def max_abs_diff(a: dict, b: dict) -> float:
    if set(a) != set(b):
        raise SystemExit(f"score sets differ: {len(a)} vs {len(b)} keys, e.g. {sorted(set(a) ^ set(b))[:3]}")
    return max(abs(a[k] - b[k]) for k in a)


def same_order(a: dict, b: dict) -> bool:
    """Whether the two score sets rank each prompt's images identically."""
    prompts = {k[0] for k in a}
    return all(sorted((k for k in a if k[0] == p), key=a.get) == sorted((k for k in b if k[0] == p), key=b.get)
               for p in prompts)


def show_cmd(cmd: list[str], images: list[str] | None = None) -> str:
    """The command as one shell line, with the image list abbreviated and repo paths relative."""
    parts = []
    skip = set(images or [])
    abbreviated = False
    for c in cmd:
        if c in skip:
            if not abbreviated:
                parts.append(f"<{len(images)} images: {_span(images)}>")
                abbreviated = True
            continue
        if c.startswith(str(ROOT) + os.sep):
            c = os.path.relpath(c, ROOT)
        parts.append(c)
    return " ".join(p if p.startswith("<") else shlex.quote(p) for p in parts)


def _span(images: list[str]) -> str:
    return images[0] if len(images) == 1 else f"{images[0]} ... {images[-1]}"


# ---------------------------------------------------------------------------------------------------------------
# The cases; each returns (console/markdown lines, raw results)


def fmt_runs(runs: list[Run]) -> str:
    return ", ".join(f"{r.wall:.1f}" for r in runs)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def verdict(ok: bool, quick: bool) -> str:
    return ("met" if ok else "NOT met") + (" at quick sizes (the target is for the full run)" if quick else "")


def case1(cfg: dict, quick: bool) -> tuple[list[str], dict]:
    model = ensure_model("pickscore-arch")
    images = ensure_images(1024, cfg["c1_images"])
    prompt = PROMPTS[0]
    # bf16 on a CPU needs its bf16 instructions: pickrank refuses it elsewhere (exit 2), so it is left out there.
    bf16 = _cpu_runs_bf16()
    order = ["base", "fp32"] + (["bf16"] if bf16 else [])
    outs = {k: BENCH / f"c1-{k}.jsonl" for k in order}
    cmds = {
        "base": reference(model, prompt, images, outs["base"]),
        "fp32": pickrank_score(model, prompt, images, outs["fp32"], "--no-cache"),
    }
    if bf16:
        cmds["bf16"] = pickrank_score(model, prompt, images, outs["bf16"], "--no-cache", "--dtype", "bf16")
    warm_up(model, images)
    labels = {"base": "baseline (reference.py, fp32)", "fp32": "pickrank score fp32", "bf16": "pickrank score bf16"}
    runs: dict[str, list[Run]] = {k: [] for k in cmds}
    for r in range(cfg["c1_rounds"]):
        print(f" round {r + 1}/{cfg['c1_rounds']}", flush=True)
        for k in (order if r % 2 == 0 else order[::-1]):
            runs[k].append(measure(labels[k], cmds[k], env=None))
    s = {k: read_scores(v) for k, v in outs.items()}
    d32 = max_abs_diff(s["fp32"], s["base"])
    spread = max(s["base"].values()) - min(s["base"].values())
    base = med(runs["base"])
    n = len(images)
    rows = []
    for k in order:
        m = med(runs[k])
        rows.append([labels[k], fmt_runs(runs[k]), f"{m:.1f}", f"{m / n:.2f}", f"{med(runs[k], 'tree_cpu'):.1f}",
                     f"{med(runs[k], 'maxrss_mb'):.0f}",
                     f"{med(runs[k], 'tree_rss_mb'):.0f}", f"{m / base:.3f}"])
    paired32 = [a.wall / b.wall for a, b in zip(runs["fp32"], runs["base"])]
    r32 = med(runs["fp32"]) / base
    lines = [f"One prompt, {n} JPEGs of 1024x1024, PickScore_v1 architecture (random weights), CPU, "
             f"{cfg['c1_rounds']} alternating round(s) (order reversed on odd rounds).", ""]
    lines += table(["run", "wall s (each round)", "median s", "s/image", "CPU s", "peak RSS MB (maxrss)",
                    "peak RSS MB (tree)", "time / baseline"], rows)
    lines += ["",
              f"- **fp32 ratio** pickrank / baseline = **{r32:.3f}** (per round: "
              f"{', '.join(f'{x:.3f}' for x in paired32)}); target {TARGETS['c1_fp32']}: {verdict(r32 <= 1.05, quick)}"]
    raw = dict(runs={k: [asdict(x) for x in v] for k, v in runs.items()}, ratio_fp32=r32, diff_fp32=d32)
    if bf16:
        d16 = max_abs_diff(s["bf16"], s["base"])
        paired16 = [b.wall / a.wall for a, b in zip(runs["bf16"], runs["base"])]
        r16 = base / med(runs["bf16"])
        lines += [f"- **bf16 speed-up** baseline fp32 / pickrank bf16 = **{r16:.2f}x** (per round: "
                  f"{', '.join(f'{x:.2f}' for x in paired16)}); target {TARGETS['c1_bf16']}: "
                  f"{verdict(r16 >= 1.7, quick)}",
                  f"- scores vs baseline, max abs diff: fp32 {d32:.2e} (same ranking: "
                  f"{same_order(s['fp32'], s['base'])}), bf16 {d16:.2e} (same ranking: "
                  f"{same_order(s['bf16'], s['base'])}); the baseline's scores span {spread:.3f} "
                  "(random weights: images score close together, so small bf16 differences can reorder them)"]
        raw.update(speedup_bf16=r16, diff_bf16=d16)
    else:
        lines += ["- **bf16**: not measured: this CPU has no bf16 instructions (AVX512-BF16/AMX), where pickrank "
                  "refuses `--dtype bf16` (exit 2) rather than run it emulated",
                  f"- scores vs baseline, max abs diff: fp32 {d32:.2e} (same ranking: "
                  f"{same_order(s['fp32'], s['base'])}); the baseline's scores span {spread:.3f}"]
    lines += ["- commands:"]
    lines += [f"  - `{show_cmd(cmds[k], images)}`" for k in order]
    return lines, raw


def _cpu_runs_bf16() -> bool:
    """Whether pickrank runs --dtype bf16 on this CPU (the check it makes itself)."""
    out = subprocess.run([sys.executable, "-c", "from pickrank.models.torch_embedder import cpu_has_bf16; print(cpu_has_bf16())"],
                         capture_output=True, text=True)
    return out.stdout.strip() == "True"


def case2(cfg: dict, quick: bool) -> tuple[list[str], dict]:
    model = ensure_model("pickscore-arch")
    images = ensure_images(1024, cfg["c2_images"])
    prompts = PROMPTS[:cfg["c2_prompts"]]
    csv_path = BENCH / f"prompts{len(prompts)}.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt"])
        w.writerows([[f"p{i}", p] for i, p in enumerate(prompts)])
    out_p = BENCH / "c2-pickrank.jsonl"
    pick_cmd = PICKRANK + ["batch", str(csv_path), *images, "--model", str(model), "--no-cache", "-q", "-f", "jsonl",
                           "-o", str(out_p)]
    base_cmds = [reference(model, p, images, BENCH / f"c2-base-{i}.jsonl") for i, p in enumerate(prompts)]
    warm_up(model, images)
    pick_runs: list[Run] = []
    base_rounds: list[list[Run]] = []
    print(" pickrank batch", flush=True)
    pick_runs.append(measure("pickrank batch", pick_cmd))
    for r in range(cfg["c2_baseline_rounds"]):
        print(f" baseline round {r + 1}/{cfg['c2_baseline_rounds']}: one process per prompt", flush=True)
        base_rounds.append([measure(f"baseline prompt {i + 1}/{len(prompts)}", c) for i, c in enumerate(base_cmds)])
        pick_runs.append(measure("pickrank batch", pick_cmd))
    sp = read_scores(out_p)
    sb: dict = {}
    for i in range(len(prompts)):
        sb.update(read_scores(BENCH / f"c2-base-{i}.jsonl"))
    diff = max_abs_diff(sp, sb)
    totals = [sum(r.wall for r in rnd) for rnd in base_rounds]
    per_prompt = [r.wall for rnd in base_rounds for r in rnd]
    base_total = statistics.median(totals)
    base_est = statistics.median(per_prompt) * len(prompts)
    pm = med(pick_runs)
    ratio, ratio_est = base_total / pm, base_est / pm
    rows = [["pickrank batch (1 process)", fmt_runs(pick_runs), f"{pm:.1f}", f"{med(pick_runs, 'maxrss_mb'):.0f}", "1"],
            [f"baseline, {len(prompts)} processes (sum per round)", ", ".join(f"{t:.1f}" for t in totals),
             f"{base_total:.1f}", f"{statistics.median(r.maxrss_mb for rnd in base_rounds for r in rnd):.0f}",
             f"{ratio:.2f}"]]
    lines = [f"`pickrank batch` with {len(prompts)} prompts over the same {len(images)} JPEGs of 1024x1024 "
             f"(PickScore architecture, fp32, CPU) vs the baseline called once per prompt: one reference.py process "
             f"per prompt, as a user of the model-card snippet would. Order: pickrank, then for each of "
             f"{cfg['c2_baseline_rounds']} baseline round(s) the {len(prompts)} baseline processes, then pickrank "
             f"again.", ""]
    lines += table(["run", "wall s (each)", "median s", "peak RSS MB (maxrss)", "baseline / pickrank"], rows)
    lines += ["",
              f"- baseline per-prompt process times: {', '.join(f'{x:.1f}' for x in per_prompt)} s; median x "
              f"{len(prompts)} = {base_est:.1f} s -> ratio {ratio_est:.2f}",
              f"- **speed-up** baseline total / pickrank batch = **{ratio:.2f}x**; target {TARGETS['c2']}: "
              f"{verdict(ratio >= 5, quick)}"
              + (f" (with {len(prompts)} prompts the ceiling is about {len(prompts)}x)" if quick else ""),
              f"- scores vs baseline, max abs diff over all prompts and images: {diff:.2e} "
              f"(same ranking: {same_order(sp, sb)})",
              "- commands:", f"  - `{show_cmd(pick_cmd, images)}`  (CSV: `{os.path.relpath(csv_path, ROOT)}`, columns "
              "id, prompt)",
              f"  - `{show_cmd(base_cmds[0], images)}` (and likewise for each prompt)"]
    raw = dict(pickrank=[asdict(x) for x in pick_runs], baseline=[[asdict(x) for x in r] for r in base_rounds],
               ratio=ratio, ratio_from_median=ratio_est, diff=diff)
    return lines, raw


def case3(cfg: dict, quick: bool, ref_cap_gb: float) -> tuple[list[str], dict]:
    model = ensure_model("tiny-clip")
    small, large = cfg["c3_sets"]
    warm_up(model, ensure_images(512, large))
    rows, raw = [], {}
    tput_ratio: dict[int, float] = {}
    pick_rss: dict[int, tuple[float, float]] = {}
    cmds_shown = []
    for n, rounds in zip(cfg["c3_sets"], cfg["c3_rounds"]):
        folder = image_folder(512, n)
        out = BENCH / f"c3-{n}.jsonl"
        pick = PICKRANK + ["score", "--prompt", PROMPTS[0], "--model", str(model), "--no-cache", "-q", "-f", "jsonl",
                           "-o", str(out), folder]
        loop = [PY, str(HERE / "decode_loop.py"), str(model), folder]
        if not cmds_shown:
            cmds_shown = [pick, loop]
        runs = {"pick": [], "loop": []}
        for r in range(rounds):
            print(f" {n} images, round {r + 1}/{rounds}", flush=True)
            for k in (("pick", "loop") if r % 2 == 0 else ("loop", "pick")):
                runs[k].append(measure(f"{'pickrank score' if k == 'pick' else 'decode loop'} ({n})",
                                       pick if k == "pick" else loop))
        got = sum(1 for _ in open(out))
        if got != n:
            raise SystemExit(f"pickrank scored {got} of {n} images")
        ips_p, ips_l = n / med(runs["pick"]), n / med(runs["loop"])
        tput_ratio[n] = ips_p / ips_l
        pick_rss[n] = (med(runs["pick"], "maxrss_mb"), med(runs["pick"], "tree_rss_mb"))
        rows.append(["pickrank score, default workers", n, fmt_runs(runs["pick"]), f"{ips_p:.0f}",
                     f"{med(runs['pick'], 'tree_cpu'):.1f}", f"{pick_rss[n][0]:.0f}", f"{pick_rss[n][1]:.0f}",
                     f"{tput_ratio[n]:.2f}"])
        rows.append(["decode loop (1 process, processor)", n, fmt_runs(runs["loop"]), f"{ips_l:.0f}",
                     f"{med(runs['loop'], 'tree_cpu'):.1f}", f"{med(runs['loop'], 'maxrss_mb'):.0f}",
                     f"{med(runs['loop'], 'tree_rss_mb'):.0f}", "1"])
        raw[n] = {k: [asdict(x) for x in v] for k, v in runs.items()}
    # The reference script (all images in memory at once), for the memory contrast: small sets, then extrapolate.
    ref_sizes = [cfg["c3_ref_small"], small]
    ref_rss = {}

    def run_reference(n: int):
        folder = image_folder(512, n)
        imgs = sorted(os.path.join(folder, x) for x in os.listdir(ROOT / folder))
        run = measure(f"reference.py ({n})", reference(model, PROMPTS[0], imgs, BENCH / f"c3-ref-{n}.jsonl"))
        ref_rss[n] = run
        rows.append(["reference.py (all images at once)", n, f"{run.wall:.1f}", f"{n / run.wall:.0f}",
                     f"{run.tree_cpu:.1f}", f"{run.maxrss_mb:.0f}", f"{run.tree_rss_mb:.0f}", ""])
        return run

    for n in ref_sizes:
        run_reference(n)
    (a, ra), (b, rb) = sorted((k, v.maxrss_mb) for k, v in ref_rss.items())
    slope = (rb - ra) / (b - a)
    est_large = rb + slope * (large - b)
    ref_note = (f"reference.py peak RSS grows by {slope * 1024:.0f} KB per image ({ref_sizes[0]} -> {small} images); "
                f"extrapolated to {large} images: {est_large / 1024:.1f} GB")
    if est_large / 1024 <= ref_cap_gb:
        run = run_reference(large)
        ref_note += f"; measured: {run.maxrss_mb / 1024:.1f} GB"
    else:
        ref_note += f" (not run: above the --ref-rss-cap-gb {ref_cap_gb:g} GB cap)"
    # Start-up free rates: the extra images of the large set over the extra time they took.
    walls = {k: {n: statistics.median(r["wall"] for r in raw[n][k]) for n in (small, large)} for k in ("pick", "loop")}
    marginal = {k: (large - small) / max(1e-9, walls[k][large] - walls[k][small]) for k in walls}
    marginal_ratio = marginal["pick"] / marginal["loop"]
    growth = pick_rss[large][0] / pick_rss[small][0] - 1
    growth_tree = pick_rss[large][1] / pick_rss[small][1] - 1
    lines = [f"Tiny random CLIP (the model costs ~nothing: this measures reading, decoding and preprocessing), "
             f"{small} and then {large} JPEGs of 512x512 (a folder each). pickrank with its default decode workers "
             f"({_default_workers()} here) vs a single-process loop `Image.open` + `processor(images=img)` over "
             f"the same files (`benchmarks/decode_loop.py`, no model). Both whole processes, alternating; images/s = "
             f"images / median wall time (start-up included).", ""]
    lines += table(["run", "images", "wall s (each round)", "images/s", "CPU s", "peak RSS MB (maxrss)",
                    "peak RSS MB (tree)",
                    "throughput / loop"], rows)
    lines += ["",
              f"- **throughput ratio** pickrank / decode loop: **{tput_ratio[small]:.2f}x** on {small}, "
              f"**{tput_ratio[large]:.2f}x** on {large}; target {TARGETS['c3_tput']}: "
              f"{verdict(min(tput_ratio.values()) >= 1.6, quick)}",
              f"- start-up-free (marginal) rates, (images {large} - {small}) / (time {large} - time {small}): pickrank "
              f"{marginal['pick']:.0f} images/s, decode loop {marginal['loop']:.0f} images/s, ratio "
              f"**{marginal_ratio:.2f}x**; start-up (time - images / marginal rate): pickrank "
              f"{walls['pick'][small] - small / marginal['pick']:.1f} s, loop {walls['loop'][small] - small / marginal['loop']:.1f} s",
              f"- **pickrank peak RSS** {large} vs {small} images: {growth:+.1%} (maxrss, largest process), "
              f"{growth_tree:+.1%} (sum over the process tree); target {TARGETS['c3_rss']}: "
              f"{verdict(abs(growth) <= 0.10 and abs(growth_tree) <= 0.10, quick)}",
              f"- {ref_note}",
              "- CPU s = CPU time of the whole process tree (decode workers included); maxrss = ru_maxrss from "
              "os.wait4 (largest single process); tree = summed RSS of the process and its decode workers, sampled "
              "every 0.25 s (shared pages counted once per process, so an upper bound)",
              "- commands:"] + [f"  - `{show_cmd(c)}`" for c in cmds_shown] + [
              f"  - `{show_cmd(reference(model, PROMPTS[0], ['IMG'], BENCH / 'c3-ref-N.jsonl'))}` "
              "(IMG = every file of the set)"]
    raw.update(marginal_rates=marginal, marginal_ratio=marginal_ratio, tput_ratio=tput_ratio, pick_rss=pick_rss, ref={k: asdict(v) for k, v in ref_rss.items()},
               ref_extrapolated_mb=est_large)
    return lines, raw


def _default_workers() -> int:
    try:
        from pickrank.core.backend import default_workers

        return default_workers()
    except Exception:  # pragma: no cover
        return os.cpu_count() or 1


def case4(cfg: dict, quick: bool) -> tuple[list[str], dict]:
    model = ensure_model("pickscore-arch")
    images = ensure_images(1024, cfg["c4_images"])
    cache = BENCH / "c4-cache.sqlite3"
    for p in BENCH.glob("c4-cache.sqlite3*"):
        p.unlink()
    warm_up(model, images)
    a, b = PROMPTS[0], PROMPTS[1]
    out1, out2, out3 = BENCH / "c4-cold.jsonl", BENCH / "c4-warm.jsonl", BENCH / "c4-nocache.jsonl"
    cold = pickrank_score(model, a, images, out1, "--cache", str(cache))
    warm = pickrank_score(model, b, images, out2, "--cache", str(cache))
    nocache = pickrank_score(model, b, images, out3, "--no-cache")
    r_cold = measure("run 1: empty cache, prompt A", cold)
    r_warm = [measure(f"run 2: same cache, prompt B ({i + 1})", warm) for i in range(cfg["c4_warm_runs"])]
    r_none = measure("--no-cache, prompt B", nocache)
    s_warm, s_none = read_scores(out2), read_scores(out3)
    diff = max_abs_diff(s_warm, s_none)
    exact = all(s_warm[k] == s_none[k] for k in s_warm)
    wm = med(r_warm)
    ratio = r_cold.wall / wm
    rows = [["run 1: empty `--cache FILE`, prompt A", f"{r_cold.wall:.1f}", f"{r_cold.wall:.1f}",
             f"{r_cold.maxrss_mb:.0f}"],
            ["run 2: same cache, prompt B", fmt_runs(r_warm), f"{wm:.1f}", f"{med(r_warm, 'maxrss_mb'):.0f}"],
            ["`--no-cache`, prompt B (for the score check)", f"{r_none.wall:.1f}", f"{r_none.wall:.1f}",
             f"{r_none.maxrss_mb:.0f}"]]
    lines = [f"Embedding cache: PickScore architecture, fp32, CPU, {len(images)} JPEGs of 1024x1024. "
             f"Run 1 fills an empty cache with prompt A; run 2 scores a new prompt B from the same cache "
             f"({cfg['c4_warm_runs']} times); a `--no-cache` run with prompt B gives the reference scores. "
             "One cold run (a cold cache cannot be repeated without re-filling it).", ""]
    lines += table(["run", "wall s (each)", "median s", "peak RSS MB (maxrss)"], rows)
    lines += ["",
              f"- **speed-up** run 1 / run 2 = **{ratio:.1f}x**; target {TARGETS['c4']}: "
              f"{verdict(ratio >= 10 and exact, quick)}",
              f"- run 2 scores vs `--no-cache` scores: max abs diff {diff:.3g}, bit-identical: {exact}",
              f"- cache file size: {sum(p.stat().st_size for p in BENCH.glob('c4-cache.sqlite3*')) / 1024:.0f} KB",
              "- commands:"] + [f"  - `{show_cmd(c, images)}`" for c in (cold, warm, nocache)]
    raw = dict(cold=asdict(r_cold), warm=[asdict(x) for x in r_warm], nocache=asdict(r_none), ratio=ratio,
               diff=diff, exact=exact)
    return lines, raw


# ---------------------------------------------------------------------------------------------------------------
# Report


def machine() -> dict:
    cpu = "unknown"
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        cpu = m.group(1).strip() if m else cpu
        m = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        flags = set(m.group(1).split()) if m else set()
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20
    except (OSError, AttributeError):
        mem = 0.0
    versions = subprocess.run([PY, "-c", "import torch, transformers, PIL, numpy; print(torch.__version__, "
                               "transformers.__version__, PIL.__version__, numpy.__version__, torch.get_num_threads())"],
                              capture_output=True, text=True, env=child_env()).stdout.split()
    torch_v, tf_v, pil_v, np_v, threads = (versions + ["?"] * 5)[:5]
    bf16 = ",".join(sorted(flags & {"avx512_bf16", "amx_bf16", "avx512f"})) or "none"
    return dict(cpu=cpu, cores=cores, mem_gib=round(mem, 1), bf16_flags=bf16, torch=torch_v, transformers=tf_v,
                pillow=pil_v, numpy=np_v, torch_threads=threads, python=platform.python_version(),
                kernel=platform.release(), load=os.getloadavg())


def case_title(case: int, cfg: dict) -> str:
    return {
        1: f"Case 1: one prompt, {cfg['c1_images']} JPEGs 1024x1024 (fp32 and bf16 vs the model-card snippet)",
        2: f"Case 2: `pickrank batch`, {cfg['c2_prompts']} prompts x {cfg['c2_images']} images vs the snippet once "
           "per prompt",
        3: f"Case 3: throughput and memory on {cfg['c3_sets'][0]:,} and {cfg['c3_sets'][1]:,} JPEGs (tiny model)",
        4: f"Case 4: embedding cache, second prompt over the same {cfg['c4_images']} images",
    }[case]
HEADER = """# pickrank benchmarks

Produced by `benchmarks/bench.py` (how to run: `benchmarks/README.md`). Every figure is a whole process
(imports and model loading included), pickrank and its baseline alternated in the same invocation; times are
medians, ratios are ratios of medians measured in the same invocation. The model is PickScore_v1's architecture
(CLIP ViT-H/14) with random weights built locally (same compute as the real weights), except case 3's tiny model.
Each section is replaced when its case is re-run; runs made with `--quick` are marked as such and do not show
the targets' sizes.
"""


def write_marked(name: str, body: list[str]) -> None:
    """Replace the section between BENCHMARKS.md's `bench:NAME` markers with `body` (appended when there is none)."""
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    section = "\n".join([begin, *body, end])
    text = REPORT.read_text(encoding="utf-8")
    pat = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pat.sub(lambda _: section, text) if pat.search(text) else text.rstrip("\n") + "\n\n" + section + "\n"
    REPORT.write_text(text, encoding="utf-8")


def write_section(case: int, title: str, body: list[str], quick: bool, mach: dict, started: dt.datetime,
                  elapsed: float, load: float) -> None:
    cmd = shlex.join([os.path.relpath(PY, ROOT) if PY.startswith(str(ROOT)) else PY,
                      os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    head = [f"## {title}" + (" — QUICK RUN (small sizes, not the benchmark)" if quick else ""), ""]
    if quick:
        head += ["> **Quick run**: reduced sizes and a single round, to check the harness; not the issue's figures.",
                 ""]
    head += [f"- command: `{cmd}`",
             f"- machine: {mach['cpu']}, {mach['cores']} cores, {mach['mem_gib']} GiB RAM, CPU flags "
             f"{mach['bf16_flags']}; Python {mach['python']}, torch {mach['torch']} ({mach['torch_threads']} threads), "
             f"transformers {mach['transformers']}, Pillow {mach['pillow']}, numpy {mach['numpy']}, "
             f"Linux {mach['kernel']}",
             f"- date: {started:%Y-%m-%d %H:%M} UTC (system clock); 1-min load average at start {load:.2f}; "
             f"this case took {elapsed / 60:.1f} min",
             ""]
    section = "\n".join([f"<!-- bench:case{case}:begin -->", *head, *body, f"<!-- bench:case{case}:end -->"])
    text = REPORT.read_text(encoding="utf-8") if REPORT.exists() else HEADER
    pat = re.compile(rf"<!-- bench:case{case}:begin -->.*?<!-- bench:case{case}:end -->", re.S)
    if pat.search(text):
        text = pat.sub(lambda _: section, text)
    else:
        # Keep the sections in case order.
        later = [m for m in re.finditer(r"<!-- bench:case(\d):begin -->", text) if int(m.group(1)) > case]
        at = later[0].start() if later else len(text)
        text = text[:at].rstrip("\n") + "\n\n" + section + "\n\n" + text[at:].lstrip("\n")
    tmp = REPORT.with_suffix(".md.tmp")
    tmp.write_text(text.rstrip("\n") + "\n", encoding="utf-8")
    os.replace(tmp, REPORT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, one round: check the harness in minutes")
    ap.add_argument("--cases", default="1,2,3,4", help="comma-separated case numbers (default: all)")
    ap.add_argument("--rounds", type=int, help="override case 1's number of alternating rounds")
    ap.add_argument("--ref-rss-cap-gb", type=float, default=12.0,
                    help="case 3: run reference.py on the large set only if its extrapolated peak RSS is below this")
    ap.add_argument("--prepare", action="store_true", help="only build the models and images, then exit")
    ap.add_argument("--no-report", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    try:
        cases = sorted({int(c) for c in args.cases.split(",") if c.strip()})
    except ValueError:
        ap.error("--cases: comma-separated numbers among 1,2,3,4")
    if not set(cases) <= {1, 2, 3, 4}:
        ap.error("--cases: comma-separated numbers among 1,2,3,4")
    cfg = dict(SIZES["quick" if args.quick else "full"])
    if args.rounds:
        cfg["c1_rounds"] = args.rounds
    BENCH.mkdir(exist_ok=True)
    if args.prepare:
        ensure_model("pickscore-arch")
        ensure_model("tiny-clip")
        ensure_images(1024, max(cfg["c1_images"], cfg["c4_images"]))
        ensure_images(512, cfg["c3_sets"][1])
        for n in (*cfg["c3_sets"], cfg["c3_ref_small"]):
            image_folder(512, n)
        return 0
    mach = machine()
    print(f"{mach['cpu']}, {mach['cores']} cores, torch {mach['torch']}, load {mach['load'][0]:.2f}"
          + ("  [QUICK]" if args.quick else ""), flush=True)
    for case in cases:
        started = dt.datetime.now(dt.timezone.utc)
        load = os.getloadavg()[0]
        title = case_title(case, cfg)
        t0 = time.perf_counter()
        n_before = len(ALL_RUNS)
        print(f"\n== {title}" + ("  [QUICK]" if args.quick else ""), flush=True)
        if case == 3:
            body, raw = case3(cfg, args.quick, args.ref_rss_cap_gb)
        else:
            body, raw = {1: case1, 2: case2, 4: case4}[case](cfg, args.quick)
        elapsed = time.perf_counter() - t0
        case_runs = ALL_RUNS[n_before:]
        if case_runs:
            loads = [r.other_load for r in case_runs]
            body += [f"- machine noise: other processes used a median {statistics.median(loads):.2f} cores "
                     f"(max {max(loads):.2f}) of the {mach['cores']} while the runs above ran"
                     + (" — **the machine was busy: treat these timings as rough**"
                        if statistics.median(loads) > 0.25 else "")]
        print("\n" + "\n".join(body), flush=True)
        (BENCH / f"results-case{case}.json").write_text(json.dumps(
            dict(quick=args.quick, machine=mach, started=started.isoformat(), config=cfg, results=raw),
            indent=1, default=str))
        if not args.no_report:
            write_section(case, title, body, args.quick, mach, started, elapsed, load)
            print(f"(written to {os.path.relpath(REPORT, ROOT)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
