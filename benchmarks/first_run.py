"""A newcomer's first run, timed and captured as they would see it: `pickrank score -p PROMPT images/` with the
default model, in a terminal, on a machine that has never downloaded it; then the same command again (model in the
Hugging Face cache, embeddings in pickrank's cache), then with a new prompt.

The hub is out of reach from the machines this is measured on, so `pickrank.devtools.LocalHub` serves a model folder
(by default one with PickScore_v1's architecture and random weights: the same 3.94 GB and compute) as
yuvalkirstain/PickScore_v1 on 127.0.0.1: the download is real (huggingface_hub, the cache, the bar) but its speed
is this machine's disk, not a network. For a real first run, add the size over your bandwidth (3.94 GB: ~5.5 min at
100 Mbit/s, ~35 s at 1 Gbit/s).

    python benchmarks/first_run.py --model-dir .bench/pickscore --images 40
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pickrank.devtools import LocalHub, build_model, run_in_pty  # noqa: E402

BAR = re.compile(r"pickrank: (downloading (?!the weights)|loading the model|embedding|discovering)[^\r\n\x1b]*")


def make_images(folder: Path, n: int, size: int) -> None:
    """n deterministic JPEGs of size x size, as a generator leaves them."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        im = Image.new("RGB", (size, size), tuple(int(x) for x in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(im)
        for _ in range(12):
            x0, y0 = (int(v) for v in rng.integers(0, size, 2))
            d.ellipse([x0, y0, x0 + int(rng.integers(20, size // 2)), y0 + int(rng.integers(20, size // 2))],
                      fill=tuple(int(x) for x in rng.integers(0, 256, 3)))
        im.save(folder / f"gen{i:03d}.jpg", quality=92)


def first_seen(stamps: list[tuple[float, str]], pattern: str) -> float | None:
    """When the output first matched `pattern` (seconds since the start)."""
    text = ""
    for t, chunk in stamps:
        text += chunk
        if re.search(pattern, text):
            return t
    return None


def last_seen(stamps: list[tuple[float, str]], pattern: str) -> float | None:
    """When a piece of output last matched `pattern` (seconds since the start)."""
    times = [t for t, chunk in stamps if re.search(pattern, chunk)]
    return times[-1] if times else None


def run(args: list[str], env: dict[str, str], cwd: Path) -> dict:
    """One run in a terminal: its wall time, when each phase showed, and the bar's distinct lines."""
    stamps: list[tuple[float, str]] = []
    started = time.monotonic()
    code, raw = run_in_pty([sys.executable, "-m", "pickrank", *args], env, cwd, cols=110, timeout=3600,
                           stamps=stamps)
    wall = time.monotonic() - started
    frames = list(dict.fromkeys(m.group(0).rstrip() for m in BAR.finditer(raw)))
    marks = {name: first_seen(stamps, pattern) for name, pattern in (
        ("download_shown", r"downloading model\.safetensors"), ("model_loaded", r"on cpu|on cuda"),
        ("first_embedded", r"embedding  [1-9]\d*/"), ("table", r"┏"))}
    marks["download_last_drawn"] = last_seen(stamps, r"downloading model\.safetensors")
    return {"code": code, "wall_s": round(wall, 1), "marks_s": {k: v and round(v, 1) for k, v in marks.items()},
            "bar": frames[:3] + ["..."] + frames[-3:] if len(frames) > 6 else frames,
            "bar_sampled": frames[::max(1, len(frames) // 12)],
            "messages": [line for line in re.sub(r"\x1b\[[0-9;]*[mK]", "", raw).replace("\r", "\n").splitlines()
                         if line.startswith("pickrank: ") and not BAR.match(line)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", default=str(ROOT / ".bench" / "pickscore"),
                    help="model folder served as the hub's (built with PickScore's architecture if missing)")
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args()
    if not (Path(a.model_dir) / "model.safetensors").exists():
        from pickrank.devtools import PICKSCORE_ARCH

        build_model(a.model_dir, PICKSCORE_ARCH)
    with tempfile.TemporaryDirectory() as tmp, LocalHub(a.model_dir) as hub:
        hub.etag(Path(a.model_dir) / "model.safetensors")  # the hub knows its hashes: not part of the timing
        work = Path(tmp)
        make_images(work / "images", a.images, a.size)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PICKRANK_"))}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(work / "hf"), HF_HUB_DISABLE_TELEMETRY="1",
                   PICKRANK_CACHE=str(work / "cache.sqlite3"), PYTHONPATH=str(ROOT), TERM="xterm")
        results = {"images": a.images, "size": a.size, "model_dir": a.model_dir, "runs": {}}
        for name, prompt in (("first", "a red apple on a wooden table"), ("again", "a red apple on a wooden table"),
                             ("new_prompt", "a castle at dawn")):
            results["runs"][name] = run(["score", "-p", prompt, "images/"], env, work)
            print(name, json.dumps(results["runs"][name], indent=1), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
