"""Pictures drawn for tests, and the lists and CSVs made of them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def draw_image(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB", fmt: str | None = None) -> Path:
    """A deterministic picture: a coloured background with a few shapes (differs per seed)."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", size, tuple(int(x) for x in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = rng.integers(0, max(1, size[0] - 1)), rng.integers(0, max(1, size[1] - 1))
        x1, y1 = x0 + rng.integers(1, size[0] + 1), y0 + rng.integers(1, size[1] + 1)
        d.ellipse([int(x0), int(y0), int(x1), int(y1)], fill=tuple(int(x) for x in rng.integers(0, 256, 3)))
    if mode != "RGB":
        im = im.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


def mixed_batch_csv(images: Path, tmp_path: Path) -> Path:
    """A prompts CSV whose `images` cells use a folder, a glob, a ';' list and a glob matching nothing (row d)."""
    import csv

    rel = os.path.relpath(images, tmp_path)
    rows = [{"id": "a", "prompt": "a red cat", "images": rel},
            {"id": "b", "prompt": "a blue dog", "images": f"{rel}/*.png"},
            {"id": "c", "prompt": "the sea", "images": f"{rel}/img0.jpg;{rel}/img2.jpg"},
            {"id": "d", "prompt": "nothing", "images": f"{rel}/*.gif"}]
    path = tmp_path / "p.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["id", "prompt", "images"])
        w.writeheader()
        w.writerows(rows)
    return path


def image_paths(folder: Path) -> list[str]:
    """All image files under folder, sorted, as strings."""
    return sorted(str(p) for p in folder.rglob("*") if p.is_file())
