"""Teaching PickScore a taste (issue 27): the learning curve on a synthetic taste, the head's form, `pickrank tune`
on 10,000 pairs from cached embeddings, and the label page's key-to-next-pair latency with 5,000 candidates.

    .venv/bin/python benchmarks/taste_bench.py                  # every part
    .venv/bin/python benchmarks/taste_bench.py --parts C,F      # some parts only

Parts: C learning curve (held-out accuracy against 50..800 labels, PickScore alone as the baseline), F the head's
form (candidates and their held-out accuracy on 400 labels, two synthetic tastes), T `pickrank tune` on 10,000 pairs
(whole processes, the embeddings already in the cache), L the label page in headless Chromium (key press -> next
pair shown, p50/p99, 5,000 candidates in 625 groups of 8 JPEGs 512x512).

The model is a "wide tiny" CLIP: the tiny test towers with PickScore's embedding width (1024), random weights; its
embeddings carry no meaning, so the tastes are synthetic: a labeller who prefers images further along a hidden
direction of the image embeddings (taste A), or along a direction whose sign depends on the prompt (taste B), with
10% of the answers flipped. The section between the `bench:taste` markers of BENCHMARKS.md is replaced.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import BENCH, PICKRANK, ROOT, child_env, ensure_images, machine, write_marked  # noqa: E402

PER_PROMPT, NOISE = 8, 0.1
WORDS = ["cat", "dog", "house", "tree", "car", "boat", "bird", "flower", "castle", "robot"]


def wide_tiny() -> Path:
    """The tiny towers with PickScore's 1024-wide embeddings, built once under .bench/."""
    from pickrank.devtools import TINY_ARCH, build_model

    folder = BENCH / "wide-tiny"
    if not (folder / "model.safetensors").exists():
        shutil.rmtree(folder, ignore_errors=True)
        build_model(folder, {**TINY_ARCH, "projection_dim": 1024}, seed=0)
    return folder


def groups(n_prompts: int, size: int = 512) -> tuple[list[str], list[str]]:
    """n_prompts x PER_PROMPT of bench.py's JPEGs: their paths (absolute) and each one's prompt."""
    paths = [str(ROOT / p) for p in ensure_images(size, n_prompts * PER_PROMPT)]
    prompts = [f"a {WORDS[(i // PER_PROMPT) % len(WORDS)]} number {i // PER_PROMPT}" for i in range(len(paths))]
    return paths, prompts


def embeddings(model: Path, paths: list[str], prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Image embeddings (N, D) and each image's prompt embedding (N, D), in process."""
    from pickrank.api import PickScorer

    scorer = PickScorer.from_pretrained(str(model))
    x = np.concatenate([scorer.embed_images(paths[i:i + 256]).numpy() for i in range(0, len(paths), 256)])
    distinct = list(dict.fromkeys(prompts))
    t = scorer.embed_texts(distinct).numpy()
    index = {p: i for i, p in enumerate(distinct)}
    return x, t[[index[p] for p in prompts]]


def utilities(x: np.ndarray, t: np.ndarray, prompt_ids: np.ndarray, taste: str) -> np.ndarray:
    """What the synthetic labeller likes: along the images' second principal direction, made orthogonal to the
    prompts' mean embedding (A); or along it for even prompts and against it for odd ones (B: a taste that depends
    on the prompt)."""
    direction = np.linalg.svd(x - x.mean(0), full_matrices=False)[2][1]
    mean = t.mean(0) / np.linalg.norm(t.mean(0))
    direction = direction - (direction @ mean) * mean
    u = x @ direction
    return u if taste == "A" else np.where(prompt_ids % 2 == 0, u, -u)


def sample(n_prompts: int, n_pairs: int, util: np.ndarray, seed: int) -> list[tuple[int, int, float]]:
    """n_pairs distinct pairs of the same prompt, labelled by the taste with NOISE of the answers flipped."""
    rng = np.random.default_rng(seed)
    pairs = [(p * PER_PROMPT + a, p * PER_PROMPT + b) for p in range(n_prompts) for a in range(PER_PROMPT)
             for b in range(a + 1, PER_PROMPT)]
    chosen = [pairs[k] for k in rng.permutation(len(pairs))[:n_pairs]]
    flip = rng.random(len(chosen)) < NOISE
    return [(a, b, float((util[b] > util[a]) != f)) for (a, b), f in zip(chosen, flip)]


def pair_data(x: np.ndarray, t: np.ndarray, rows: list[tuple[int, int, float]], scale: float):
    from pickrank.taste.fit import PairData

    used = sorted({i for a, b, _ in rows for i in (a, b)})
    at = {i: k for k, i in enumerate(used)}
    prompt_of = {i: i // PER_PROMPT for i in used}
    prompts = sorted(set(prompt_of.values()))
    pt = {p: k for k, p in enumerate(prompts)}
    text = np.stack([t[p * PER_PROMPT] for p in prompts])
    return PairData(text, x[used], np.array([pt[prompt_of[a]] for a, _, _ in rows]),
                    np.array([at[a] for a, _, _ in rows]), np.array([at[b] for _, b, _ in rows]),
                    np.array([lab for _, _, lab in rows], np.float32), np.zeros(len(rows), int), ("synthetic",),
                    scale)


def part_c_and_f(model: Path, parts: set[str]) -> list[str]:
    """The learning curve (C) and the head's form (F), in process, on 200 prompts x 8 images."""
    from pickrank.taste.fit import tune_head

    n_prompts = 200
    paths, prompts = groups(n_prompts)
    x, t = embeddings(model, paths, prompts)
    scale = 100.0
    ids = np.arange(len(paths)) // PER_PROMPT
    out: list[str] = []
    if "C" in parts:
        util = utilities(x, t, ids, "A")
        out += ["### Learning curve: held-out accuracy against the number of labels (synthetic taste A, 10% noise)",
                "", "Nested 5-fold cross-validation over prompts (each pair judged by a head that never saw its "
                "prompt), the paper's protocol as `pickrank eval`; mean of 3 draws of the labels (min-max).", "",
                "| labels | PickScore | PickScore + head | difference (95% paired bootstrap, first draw) | "
                "tune s (library, no I/O) |", "|---|---|---|---|---|"]
        for n in (50, 100, 200, 400, 800):
            runs, took = [], []
            for seed in range(3):
                data = pair_data(x, t, sample(n_prompts, n, util, seed), scale)
                start = time.perf_counter()
                runs.append(tune_head(data, seed=seed))
                took.append(time.perf_counter() - start)
            base, head = [r.pickscore for r in runs], [r.head for r in runs]
            ci = runs[0].interval
            out.append(f"| {n} | {np.mean(base):.3f} ({min(base):.3f}-{max(base):.3f}) | {np.mean(head):.3f} "
                       f"({min(head):.3f}-{max(head):.3f}) | {runs[0].difference:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] "
                       f"| {statistics.median(took):.2f} |")
            print(out[-1], flush=True)
        out.append("")
    if "F" in parts:
        forms = [("a * PickScore (a temperature only)", 0, 0), ("+ linear image term, 16 image directions", 0, 16),
                 ("+ linear image term, 64 image directions (the default)", 0, 64),
                 ("+ linear image term, 256 image directions", 0, 256),
                 ("+ linear, 64 directions, + rank-2 prompt-image interaction", 2, 64),
                 ("+ linear, 64 directions, + rank-4 prompt-image interaction", 4, 64)]
        out += ["### The head's form: candidates on 400 labels (held-out accuracy, nested cross-validation)", "",
                "Taste A: one direction whatever the prompt; taste B: the same direction, its sign flipped for every "
                "other prompt (a taste that depends on the prompt). Mean of 3 draws.", "",
                "| form | taste A | taste B | tune s (taste A) |", "|---|---|---|---|"]
        for name, rank, k in forms:
            row, took = [], []
            for taste in ("A", "B"):
                util = utilities(x, t, ids, taste)
                accs = []
                for seed in range(3):
                    data = pair_data(x, t, sample(n_prompts, 400, util, seed), scale)
                    start = time.perf_counter()
                    accs.append(tune_head(data, rank=rank, k=k, seed=seed).head)
                    if taste == "A":
                        took.append(time.perf_counter() - start)
                row.append(f"{np.mean(accs):.3f}")
            out.append(f"| {name} | {row[0]} | {row[1]} | {statistics.median(took):.2f} |")
            print(out[-1], flush=True)
        out.append("")
    return out


def write_labels(path: Path, paths: list[str], prompts: list[str], rows: list[tuple[int, int, float]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for a, b, lab in rows:
            f.write(json.dumps({"prompt": prompts[a], "image_0": paths[a], "image_1": paths[b], "label": lab,
                                "labeler": "synthetic"}) + "\n")


def part_t(model: Path, rounds: int) -> list[str]:
    """`pickrank tune` on 10,000 pairs over 500 prompts x 8 JPEGs 512x512, the embeddings in the cache."""
    n_prompts, n_pairs = 500, 10_000
    paths, prompts = groups(n_prompts)
    x, t = embeddings(model, paths, prompts)
    labels, cache = BENCH / "taste-10k.jsonl", BENCH / "taste-cache.sqlite3"
    write_labels(labels, paths, prompts, sample(n_prompts, n_pairs, utilities(x, t, np.arange(len(paths)) //
                                                                              PER_PROMPT, "A"), 0))
    cache.unlink(missing_ok=True)
    head = BENCH / "taste-10k.safetensors"
    cmd = [*PICKRANK, "tune", str(labels), "-o", str(head), "--model", str(model), "--cache", str(cache), "-q",
           "-f", "json"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=child_env(), cwd=ROOT, stdout=subprocess.DEVNULL)
    first = time.perf_counter() - start
    walls, report = [], {}
    for _ in range(rounds):
        start = time.perf_counter()
        proc = subprocess.run(cmd, check=True, env=child_env(), cwd=ROOT, capture_output=True, text=True)
        walls.append(time.perf_counter() - start)
        report = json.loads(proc.stdout)
    held = report["heldout"]
    return ["### `pickrank tune` on 10,000 pairs from cached embeddings", "",
            f"- labels: {n_pairs:,} pairs (synthetic taste A, 10% noise) over {n_prompts} prompts x {PER_PROMPT} "
            f"JPEGs 512x512 ({len(paths):,} images); model: wide tiny (1024-wide embeddings)",
            "- command: `pickrank tune taste-10k.jsonl -o head.safetensors --model wide-tiny --cache FILE -q -f json`",
            f"- first run (embeds the {len(paths):,} images into the cache): {first:.1f} s",
            f"- **from the cache, whole process** (import, reading and hashing every file, the cache, nested "
            f"5-fold cross-validation over 10 lambdas, the bootstrap, the head written): runs "
            f"{', '.join(f'{w:.1f}' for w in walls)} s, **median {statistics.median(walls):.1f} s** (target < 30 s)",
            f"- its figures: PickScore {held['pickscore']:.3f}, head {held['head']:.3f} held out; head file "
            f"{head.stat().st_size / 1024:.0f} KB", ""]


def label_source(n_prompts: int) -> Path:
    """A best-of-n folder: n_prompts groups of PER_PROMPT JPEGs 512x512 (hard links) with a prompt.txt each."""
    paths, prompts = groups(n_prompts)
    folder = BENCH / f"taste-label-{n_prompts}"
    if not (folder / f"g{n_prompts - 1:04d}" / "prompt.txt").exists():
        shutil.rmtree(folder, ignore_errors=True)
        for i, p in enumerate(paths):
            g = folder / f"g{i // PER_PROMPT:04d}"
            g.mkdir(parents=True, exist_ok=True)
            (g / "prompt.txt").write_text(prompts[i], encoding="utf-8")
            os.link(p, g / os.path.basename(p))
    return folder


def latency(model: Path, source: Path, order: str, presses: int) -> tuple[list[float], float]:
    """Key press -> next pair shown (ms), for `presses` keys cycling left, right, tie and skip; and the seconds
    from the command's start to the first pair shown."""
    from tests.support.browser import Browser
    from tests.support.labelling import running_label

    labels = BENCH / f"taste-latency-{order}.jsonl"
    labels.unlink(missing_ok=True)
    profile = BENCH / f"taste-profile-{order}"
    shutil.rmtree(profile, ignore_errors=True)
    out: list[float] = []
    with Browser(profile) as browser:
        start = time.perf_counter()
        with running_label(str(source), "--labels", str(labels), "--model", str(model), "--order", order,
                           "--no-cache", env=child_env()) as session:
            browser.goto(session.url + "/")
            browser.wait_for('document.querySelector("main") && '
                             'document.querySelector("main").getAttribute("data-shown") === "1"', timeout=120)
            first = time.perf_counter() - start
            for i in range(presses):
                before = int(browser.js('document.querySelector("main").getAttribute("data-shown")'))
                browser.press(("ArrowLeft", "ArrowRight", "ArrowDown", " ")[i % 4])
                browser.wait_for(f'Number(document.querySelector("main").getAttribute("data-shown")) > {before}')
                out.append(float(browser.js('document.querySelector("main").getAttribute("data-ms")')))
    shutil.rmtree(profile, ignore_errors=True)
    return out, first


def part_l(model: Path, presses: int) -> list[str]:
    source = label_source(625)
    rows = ["### The label page: key press to the next pair shown, 5,000 candidates", "",
            f"- source: 625 best-of-n groups x {PER_PROMPT} JPEGs 512x512 (5,000 candidates); pictures made in the "
            "decode workers ahead of time (the pair after the one shown), 1024 px JPEGs; headless Chromium driven "
            "through the DevTools protocol (tests/support/browser.py), keys cycling left, right, tie, skip",
            "- the figure is the page's own: performance.now() from the keydown to both pictures of the next pair "
            "decoded and in the page (main[data-ms])", "",
            "| order | presses | p50 ms | p90 ms | p99 ms | max ms | start to first pair s |", "|---|---|---|---|---|---|---|"]
    for order in ("random", "uncertain"):
        ms, first = latency(model, source, order, presses)
        q = np.percentile(ms, [50, 90, 99])
        rows.append(f"| {order} | {len(ms)} | {q[0]:.1f} | {q[1]:.1f} | {q[2]:.1f} | {max(ms):.1f} | {first:.1f} |")
        print(rows[-1], flush=True)
    rows += ["", "With `uncertain` the wide tiny model scores the 5,000 candidates in a background thread while "
             "the page is in use (PickScore on this CPU would take hours for them: the page asks random pairs "
             "until a prompt is scored).", ""]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="C,F,T,L")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs of part T")
    ap.add_argument("--presses", type=int, default=300, help="key presses per order in part L")
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    BENCH.mkdir(exist_ok=True)
    model = wide_tiny()
    mach = machine()
    started = dt.datetime.now(dt.timezone.utc)
    body = ["## Teaching PickScore a taste (issue 27)", "",
            f"- command: `{' '.join(['.venv/bin/python', 'benchmarks/taste_bench.py', *sys.argv[1:]])}`",
            f"- machine: {mach['cpu']}, {mach['cores']} cores, {mach['mem_gib']} GiB RAM; Python {mach['python']}, "
            f"torch {mach['torch']}, numpy {mach['numpy']}; 1-min load average at start {mach['load'][0]:.2f}",
            f"- date: {started:%Y-%m-%d %H:%M} UTC (system clock)",
            "- the machine's 2 cores were shared with other helpers' test runs: every time below is noisy",
            "- model: the tiny test towers with PickScore's embedding width (1024), random weights; the tastes are "
            "synthetic (a hidden direction of the image embeddings, 10% of the answers flipped), so the curve "
            "answers \"how many labels\" for a taste of that kind only", ""]
    if parts & {"C", "F"}:
        body += part_c_and_f(model, parts)
    if "T" in parts:
        body += part_t(model, args.rounds)
    if "L" in parts:
        body += part_l(model, args.presses)
    print("\n".join(body))
    if not args.no_report:
        write_marked("taste", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
