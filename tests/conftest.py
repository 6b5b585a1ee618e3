"""Shared fixtures: a small real CLIP model (random weights, fixed seed) built once per session, and images."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pickrank.devtools import build_model

# A test suite started in the background of a non-interactive shell (`make test &`, nohup) inherits SIGINT
# ignored, and so would every pickrank it starts: the Ctrl-C tests would see no Ctrl-C. Python's own handler here
# makes the children start with the default disposition, as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own cache file and no network; nothing touches ~/.cache."""
    monkeypatch.setenv("PICKRANK_CACHE", str(tmp_path_factory.mktemp("cache") / "emb.sqlite3"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PICKRANK_MODEL", raising=False)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIPModel with the real code path: tokenizer, LAION preprocessor config, safetensors."""
    return build_model(tmp_path_factory.mktemp("tiny-clip"), seed=0)


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


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A folder of six images of odd sizes and formats, one in a subfolder."""
    folder = tmp_path / "imgs"
    sizes = [(300, 200), (201, 333), (224, 224), (97, 1203), (640, 480)]
    for i, size in enumerate(sizes):
        draw_image(folder / f"img{i}.{'png' if i % 2 else 'jpg'}", size, seed=i)
    draw_image(folder / "sub" / "deep.webp", (150, 170), seed=42)
    return folder


@pytest.fixture
def count_embeds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A thin counting wrapper around the real Embedder.embed_images: how many images reached the model."""
    from pickrank.models.torch_embedder import Embedder

    calls: list[int] = []
    real = Embedder.embed_images

    def counting(self, pixels):
        calls.append(len(pixels))
        return real(self, pixels)

    monkeypatch.setattr(Embedder, "embed_images", counting)
    return calls


@pytest.fixture
def runner():
    from typer.testing import CliRunner

    return CliRunner()


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


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
