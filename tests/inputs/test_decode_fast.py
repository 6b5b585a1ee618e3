"""--decode fast: JPEGs decoded at reduced DCT scale before the exact preprocessing; opt-in, its own cache
entries, and it reaches the decode workers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pickrank.inputs.decode import ImageSpec, decode_and_preprocess
from pickrank.options import Decode, ModelOptions
from tests.support.commands import invoke, jsonl
from tests.support.images import draw_image

FAST = replace(ImageSpec(), decode="fast")


def textured_jpeg(path: Path, size: int, seed: int) -> Path:
    """A photo-like JPEG: smooth gradients plus noise (flat shapes alone would hide resampling differences)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * x + seed), np.cos(5 * y), np.sin(4 * (x + y))], -1) * 100 + 128
    arr = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=90)
    return path


def test_exact_is_the_default_and_its_fingerprint_is_unchanged() -> None:
    assert ModelOptions().decode is Decode.exact and ImageSpec().decode == "exact"
    assert "decode" not in ImageSpec().fingerprint()  # the cache entries made before --decode stay valid
    assert ImageSpec().fingerprint() != FAST.fingerprint()


def test_fast_differs_from_exact_by_a_small_amount_on_large_jpegs(tmp_path: Path) -> None:
    diffs = []
    for seed in range(3):
        data = textured_jpeg(tmp_path / f"{seed}.jpg", 1024, seed).read_bytes()
        exact = decode_and_preprocess("k", data, ImageSpec()).pixels.astype(np.int16)
        fast = decode_and_preprocess("k", data, FAST).pixels.astype(np.int16)
        assert fast.shape == exact.shape == (3, 224, 224)
        diffs.append(np.abs(fast - exact))
    d = np.stack(diffs)
    assert 0 < d.mean() < 3 and d.max() < 64, (d.mean(), d.max())


def test_fast_leaves_other_formats_and_small_jpegs_as_they_are(tmp_path: Path) -> None:
    for name, size in (("big.png", (1024, 1024)), ("small.jpg", (300, 200)), ("big.webp", (1024, 768))):
        data = draw_image(tmp_path / name, size, seed=3).read_bytes()
        assert np.array_equal(decode_and_preprocess("k", data, FAST).pixels,
                              decode_and_preprocess("k", data, ImageSpec()).pixels), name


def run(*args: str, env: dict) -> tuple[int, str, str]:
    r = invoke(*args, env=env)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture
def big_jpegs(tmp_path: Path) -> Path:
    for i in range(3):
        textured_jpeg(tmp_path / "big" / f"{i}.jpg", 1024, i)
    return tmp_path / "big"


def test_fast_has_its_own_cache_entries(model_dir: Path, big_jpegs: Path, tmp_path: Path) -> None:
    env = {"PICKRANK_CACHE": str(tmp_path / "c.sqlite3")}
    args = ["score", "-p", "a cat", str(big_jpegs), "--model", str(model_dir), "-f", "jsonl", "--workers", "0"]
    said = [run(*args, *extra, env=env)[2] for extra in ([], ["--decode", "fast"], ["--decode", "fast"],
                                                         ["--decode", "exact"])]
    assert "3 embedded, 0 from cache" in said[0]
    assert "3 embedded, 0 from cache" in said[1], "an exact entry was served to a fast run"
    assert "0 embedded, 3 from cache" in said[2] and "0 embedded, 3 from cache" in said[3]


def test_exact_output_is_byte_identical_and_fast_reaches_the_workers(model_dir: Path, big_jpegs: Path) -> None:
    env = {"PICKRANK_CACHE": "/nonexistent-never-used"}
    base = ["score", "-p", "a cat", str(big_jpegs), "--model", str(model_dir), "-f", "jsonl", "--no-cache"]
    default = run(*base, "--workers", "0", env=env)
    exact = run(*base, "--workers", "0", "--decode", "exact", env=env)
    assert default[0] == exact[0] == 0 and default[1] == exact[1]
    inline = jsonl(run(*base, "--workers", "0", "--decode", "fast", env=env)[1])
    pooled = jsonl(run(*base, "--workers", "2", "--decode", "fast", env=env)[1])
    exact_scores = {r["path"]: r["score"] for r in jsonl(exact[1])}
    assert {r["path"]: r["score"] for r in inline} == {r["path"]: r["score"] for r in pooled}
    assert any(abs(r["score"] - exact_scores[r["path"]]) > 0 for r in pooled), "the workers decoded exactly"
