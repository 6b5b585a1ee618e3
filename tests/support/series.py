"""A training run's checkpoints drawn for the signals' tests: folders of samples per prompt (prompts-csv layout),
each checkpoint its own transform of the same base pictures."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

Transform = Callable[[Image.Image, int, int], Image.Image]  # (picture, prompt index, sample index) -> picture


def saturated(factor: float) -> Transform:
    """Colour saturation multiplied by `factor` (PIL's ImageEnhance.Color)."""
    return lambda im, p, k: ImageEnhance.Color(im).enhance(factor)


def same(im: Image.Image, p: int, k: int) -> Image.Image:
    return im


def copies(im: Image.Image, p: int, k: int) -> Image.Image:
    """Every sample of a prompt is the same picture (its first sample's)."""
    return base_picture(p, 0)


def checkerboard(im: Image.Image, p: int, k: int) -> Image.Image:
    """The picture with a 2-pixel checkerboard texture over it."""
    a = np.asarray(im).astype(np.int16)
    board = ((np.indices(a.shape[:2]).sum(axis=0) // 2) % 2 * 2 - 1)[..., None] * 60
    return Image.fromarray(np.clip(a + board, 0, 255).astype(np.uint8))


def base_picture(p: int, k: int, size: int = 96) -> Image.Image:
    """Prompt p's k-th sample before any checkpoint's transform."""
    rng = np.random.default_rng(1000 * p + k)
    im = Image.new("RGB", (size, size), tuple(int(x) for x in rng.integers(60, 200, 3)))


    d = ImageDraw.Draw(im)
    for _ in range(5):
        x0, y0 = (int(v) for v in rng.integers(0, size - 10, 2))
        d.ellipse([x0, y0, x0 + int(rng.integers(8, size // 2)), y0 + int(rng.integers(8, size // 2))],
                  fill=tuple(int(x) for x in rng.integers(60, 200, 3)))
    return im


def build_series(root: Path, checkpoints: Mapping[str, Transform], prompts: int = 20, samples: int = 2,
                 prompt: str | None = None) -> Path:
    """root/<checkpoint>/<id>/<k>.png for each checkpoint (in the mapping's order), and root/prompts.csv (every
    prompt's text `prompt`, or "picture number <id>")."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "prompts.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt"])
        w.writerows([[str(p), prompt or f"picture number {p}"] for p in range(prompts)])
    for name, transform in checkpoints.items():
        for p in range(prompts):
            folder = root / name / str(p)
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(samples):
                transform(base_picture(p, k), p, k).save(folder / f"{k}.png")
    return root / "prompts.csv"
