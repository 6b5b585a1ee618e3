#!/usr/bin/env python
"""ONNX export, the ONNX Runtime backend and --decode fast, measured as benchmarks/bench.py measures.

    .venv/bin/python benchmarks/onnx_bench.py [--parts export,runtime,startup,decode] [--quick] [--write]

Every measured run is a whole process (bench.py's `measure`: wall time, CPU, peak memory), the compared commands
alternating round by round in one invocation; times are medians.

  export   `pickrank export onnx` of PickScore's architecture (random weights, ~4 GB: external data) into
           .bench/pickscore-onnx; its time, peak memory and the parity figures of its manifest (the export itself
           refuses to finish beyond 1e-4)
  runtime  one prompt over 16 JPEGs 1024x1024 on that architecture: ONNX Runtime fp32 vs torch fp32 (vs torch bf16
           where the CPU has bf16 instructions), plus torch fp32 --decode fast: time, peak memory, max score
           difference to torch fp32 exact
  startup  4 images, the tiny model, `--backend onnx` vs torch: median of 5 whole processes each
  decode   --decode fast vs exact, the tiny model, --no-cache, 2,000 JPEGs of 1024x1024 and 500 of 2048x2048: images/s

--onnx-python runs the ONNX commands with another interpreter (an environment without torch: start-up there is
what a deployment sees). --write puts the section into BENCHMARKS.md (case 5); results go to .bench/onnx-*.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402 - the harness: measure, models, images, tables, BENCHMARKS.md sections
from bench import BENCH, PICKRANK, fmt_runs, max_abs_diff, measure, med, read_scores, table  # noqa: E402

bench.__file__ = __file__  # write_section names the script that ran by its module's __file__
PROMPT = bench.PROMPTS[0]
# decode: JPEGs per size (2,000 of 1024x1024 as the issue asks; 500 of 2048x2048, each 4x the work)
SIZES = {"full": dict(images=16, rounds=3, startup_runs=5, decode={1024: 2000, 2048: 500}, decode_rounds=3),
         "quick": dict(images=4, rounds=1, startup_runs=2, decode={1024: 100}, decode_rounds=1)}


def onnx_cmd(python: str | None) -> list[str]:
    """How the ONNX runs start: this interpreter's pickrank, or another environment's."""
    return [python, "-m", "pickrank"] if python else PICKRANK


def score_cmd(base: list[str], model: Path, images: list[str] | str, out: Path, *opts: str) -> list[str]:
    paths = [images] if isinstance(images, str) else images
    return base + ["score", "--prompt", PROMPT, "--model", str(model), "--no-cache", "-q", "-f", "jsonl",
                   "-o", str(out), *opts, *paths]


def export_part(cfg: dict, arch: Path) -> tuple[list[str], dict]:
    """Export the PickScore architecture once (replacing an earlier export there) and report its manifest."""
    out = BENCH / "pickscore-onnx"
    run = measure("pickrank export onnx", PICKRANK + ["export", "onnx", str(out), "--model", str(arch), "-q"])
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = {n: (out / n).stat().st_size / 2**30 for n in sorted(os.listdir(out)) if n.endswith((".onnx", ".data"))}
    p = manifest["parity"]
    lines = [f"- export of PickScore's architecture: {run.wall:.0f} s, peak RSS {run.maxrss_mb / 1024:.1f} GiB; "
             f"files: " + ", ".join(f"{n} {s:.2f} GiB" for n, s in sizes.items()),
             f"- round trip (ONNX Runtime vs torch, fp32, {p['images']} generated images x {p['prompts']} prompts): "
             f"max score difference **{p['max_score_diff']:.2e}** (tolerance {p['tolerance']:g}), embeddings "
             f"{p['max_text_embedding_diff']:.2e} (text) / {p['max_image_embedding_diff']:.2e} (image)"]
    return lines, {"wall": run.wall, "maxrss_mb": run.maxrss_mb, "sizes_gib": sizes, "parity": p}


def runtime_part(cfg: dict, arch: Path, onnx_python: str | None) -> tuple[list[str], dict]:
    """ONNX fp32 vs torch fp32 (vs bf16) vs torch --decode fast, alternating, on the PickScore architecture."""
    export = BENCH / "pickscore-onnx"
    if not (export / "manifest.json").exists():
        raise SystemExit(f"{export}: no export yet: run --parts export first")
    images = bench.ensure_images(1024, cfg["images"])
    outs = {k: BENCH / f"onnx-runtime-{k}.jsonl" for k in ("torch", "onnx", "bf16", "fast")}
    cmds = {"torch": score_cmd(PICKRANK, arch, images, outs["torch"]),
            "onnx": score_cmd(onnx_cmd(onnx_python), export, images, outs["onnx"]),
            "fast": score_cmd(PICKRANK, arch, images, outs["fast"], "--decode", "fast")}
    if bench._cpu_runs_bf16():
        cmds["bf16"] = score_cmd(PICKRANK, arch, images, outs["bf16"], "--dtype", "bf16")
    bench.warm_up(arch, images)
    runs: dict[str, list] = {k: [] for k in cmds}
    for r in range(cfg["rounds"]):
        for k, cmd in cmds.items():
            runs[k].append(measure(f"{k} (round {r + 1})", cmd))
    ref = read_scores(outs["torch"])
    labels = {"torch": "torch fp32", "onnx": "ONNX Runtime fp32", "bf16": "torch bf16",
              "fast": "torch fp32 --decode fast"}
    rows = [[labels[k], f"{med(v):.1f} ({fmt_runs(v)})", f"{med(v, 'maxrss_mb') / 1024:.2f}",
             f"{max_abs_diff(read_scores(outs[k]), ref):.2e}"] for k, v in runs.items()]
    lines = table(["run", "time s (median; rounds)", "peak RSS GiB", "max score diff vs torch fp32"], rows)
    if "bf16" not in cmds:
        lines += ["", "- **bf16**: not measured: this CPU has no bf16 instructions (AVX512-BF16/AMX), where pickrank "
                      "refuses `--dtype bf16` (exit 2) rather than run it emulated"]
    raw = {k: [vars(x) for x in v] for k, v in runs.items()}
    return lines, raw


def startup_part(cfg: dict, onnx_python: str | None) -> tuple[list[str], dict]:
    """Whole-process time of a 4-image score on the tiny model: ONNX backend vs torch (median of N, alternating)."""
    tiny = bench.ensure_model("tiny-clip")
    export = BENCH / "tiny-onnx"
    if not (export / "manifest.json").exists():
        measure("export tiny", PICKRANK + ["export", "onnx", str(export), "--model", str(tiny), "-q"])
    images = bench.ensure_images(1024, 4)
    out = BENCH / "onnx-startup.jsonl"
    cmds = {"torch": score_cmd(PICKRANK, tiny, images, out), "onnx": score_cmd(onnx_cmd(onnx_python), export,
                                                                             images, out)}
    runs: dict[str, list] = {k: [] for k in cmds}
    for i in range(cfg["startup_runs"]):
        for k, cmd in cmds.items():
            runs[k].append(measure(f"start-up {k} ({i + 1})", cmd))
    rows = [[k, f"{med(v):.2f} ({fmt_runs(v)})", f"{med(v, 'maxrss_mb'):.0f}"] for k, v in runs.items()]
    lines = table(["backend (4 images, tiny model)", "time s (median; runs)", "peak RSS MB"], rows)
    where = f" (ONNX runs with {onnx_python})" if onnx_python else ""
    lines += ["", f"- start-up, ONNX / torch: {med(runs['onnx']) / med(runs['torch']):.2f}x{where}"]
    return lines, {k: [vars(x) for x in v] for k, v in runs.items()}


def decode_part(cfg: dict) -> tuple[list[str], dict]:
    """--decode fast vs exact on many large JPEGs with the tiny model (decoding is all the work there)."""
    tiny = bench.ensure_model("tiny-clip")
    rows, raw = [], {}
    for size, n in cfg["decode"].items():
        folder = bench.image_folder(size, n)
        outs = {m: BENCH / f"onnx-decode-{size}-{m}.jsonl" for m in ("exact", "fast")}
        runs: dict[str, list] = {"exact": [], "fast": []}
        for r in range(cfg["decode_rounds"]):
            for m in runs:
                runs[m].append(measure(f"{size} {m} (round {r + 1})",
                                       score_cmd(PICKRANK, tiny, folder, outs[m], "--decode", m)))
        ex, fa = med(runs["exact"]), med(runs["fast"])
        diff = max_abs_diff(read_scores(outs["fast"]), read_scores(outs["exact"]))
        rows.append([f"{n:,} x {size}x{size}", f"{n / ex:.0f} ({fmt_runs(runs['exact'])})",
                     f"{n / fa:.0f} ({fmt_runs(runs['fast'])})", f"{ex / fa:.2f}x", f"{diff:.2e}"])
        raw[size] = {m: [vars(x) for x in v] for m, v in runs.items()}
    lines = table(["JPEGs", "exact images/s (rounds s)", "fast images/s (rounds s)", "speed-up",
                   "max score diff (tiny model)"], rows)
    return lines, raw


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="export,runtime,startup,decode")
    ap.add_argument("--quick", action="store_true", help="small sizes, one round: checks the harness")
    ap.add_argument("--n", type=int, help="JPEGs per size for the decode part [default: 2000 of 1024x1024, 500 of "
                    "2048x2048; --quick: 100 of 1024x1024]")
    ap.add_argument("--onnx-python", help="interpreter of an ONNX-only environment for the ONNX runs")
    ap.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = ap.parse_args()
    cfg = dict(SIZES["quick" if args.quick else "full"])
    if args.n:
        cfg["decode"] = {size: args.n for size in cfg["decode"]}
    BENCH.mkdir(exist_ok=True)
    started, load, t0 = dt.datetime.now(dt.timezone.utc), os.getloadavg()[0], dt.datetime.now().timestamp()
    parts = args.parts.split(",")
    arch = bench.ensure_model("pickscore-arch") if {"export", "runtime"} & set(parts) else None
    body: list[str] = []
    titles = {"export": "Export and round trip (PickScore architecture)",
              "runtime": f"One prompt, {cfg['images']} JPEGs 1024x1024, PickScore architecture",
              "startup": "Start-up: 4 images, tiny model", "decode": "--decode fast vs exact (tiny model)"}
    for part in parts:
        print(f"== {part}", flush=True)
        lines, raw = {"export": lambda: export_part(cfg, arch), "runtime": lambda: runtime_part(cfg, arch,
                                                                                                args.onnx_python),
                      "startup": lambda: startup_part(cfg, args.onnx_python), "decode": lambda: decode_part(cfg)}[part]()
        (BENCH / f"onnx-{part}.json").write_text(json.dumps(raw, indent=1, default=str))
        body += [f"### {titles[part]}", "", *lines, ""]
        print("\n".join(lines), flush=True)
    if args.write:
        elapsed = dt.datetime.now().timestamp() - t0
        bench.write_section(5, "ONNX Runtime backend and --decode fast", body, args.quick,
                            bench.machine(), started, elapsed, load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
