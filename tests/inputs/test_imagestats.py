"""The image statistics (README, "Watch a training run"): equal to a direct numpy computation on the same
preprocessed pixels, computed by the decode workers, and known answers on pictures built for them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pickrank.inputs.decode import ImageSpec, decode_and_preprocess, image_pixels
from pickrank.inputs.imagestats import PATCH, STAT_NAMES, STRIDE, ImageStats, image_stats
from pickrank.inputs.workers import decode_job, decode_many
from tests.support.images import draw_image
from tests.support.series import base_picture, checkerboard, saturated


def direct(pixels: np.ndarray, patch: np.ndarray) -> dict[str, float]:
    """Each statistic written out again by other numpy routes than the module's: colours from every other
    preprocessed pixel, sharpness and high frequencies from the native-resolution patch."""
    hwc = pixels.transpose(1, 2, 0).astype(np.float64)[::STRIDE, ::STRIDE]
    r, g, b = hwc[..., 0], hwc[..., 1], hwc[..., 2]
    y = (0.299 * r + 0.587 * g + 0.114 * b)  # 0..255
    mx, mn = hwc.max(axis=2), hwc.min(axis=2)
    sat = np.where(mx > 0, (mx - mn) / np.where(mx > 0, mx, 1), 0.0)
    rg, yb = r - g, (r + g) / 2 - b
    p = patch.transpose(1, 2, 0).astype(np.float64)
    fine = 0.299 * p[..., 0] + 0.587 * p[..., 1] + 0.114 * p[..., 2]
    kernel = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=float)
    lap = np.einsum("ijkl,kl->ij", np.lib.stride_tricks.sliding_window_view(fine, (3, 3)), kernel)
    f = np.fft.fftshift(np.fft.fft2(fine / 255 - (fine / 255).mean()))
    h, w = fine.shape
    fy, fx = np.meshgrid(np.fft.fftshift(np.fft.fftfreq(h)), np.fft.fftshift(np.fft.fftfreq(w)), indexing="ij")
    power = np.abs(f) ** 2
    return {"saturation": sat.mean(), "brightness": y.mean() / 255, "contrast": (y / 255).std(),
            "colourfulness": np.sqrt(rg.var() + yb.var()) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2),
            "sharpness": lap.var(), "hf_energy": power[np.sqrt(fx ** 2 + fy ** 2) > 0.25].sum() / power.sum()}


@pytest.mark.parametrize("size", [(300, 200), (97, 400), (224, 224), (600, 520)])
def test_statistics_equal_numpy_on_the_same_pixels(tmp_path, size):
    drawn = np.asarray(Image.open(draw_image(tmp_path / "a.png", size, seed=sum(size))).convert("RGB"))
    noise = np.random.default_rng(0).integers(-20, 21, drawn.shape)  # texture everywhere, the centre included
    path = tmp_path / "b.png"
    Image.fromarray(np.clip(drawn + noise, 0, 255).astype(np.uint8)).save(path)
    data = path.read_bytes()
    spec = ImageSpec()
    pixels = image_pixels(str(path), spec)
    w, h = size
    left, top = (w - min(w, PATCH)) // 2, (h - min(h, PATCH)) // 2
    patch = np.asarray(Image.open(path).convert("RGB"))[top:top + min(h, PATCH), left:left + min(w, PATCH)]
    expected = direct(pixels, patch.transpose(2, 0, 1))
    got = decode_and_preprocess("k", data, spec, stats=True).stats
    for name in STAT_NAMES:
        assert getattr(got, name) == pytest.approx(expected[name], rel=1e-5, abs=1e-9), name  # float32
    # the worker's unit computes them from the pixels it decoded, only when asked
    assert decode_job("k", data, spec, None).stats is None
    decoded = decode_job("k", data, spec, None, stats=True)
    assert decoded.stats == got and np.array_equal(decoded.pixels, pixels)
    assert decode_many([("k", data)], spec, None, True)[0].stats == got
    assert ImageStats.from_values(np.asarray(got.values())) == got
    # without a patch, every statistic comes from the preprocessed pixels
    alone = direct(pixels, pixels)
    assert image_stats(pixels).hf_energy == pytest.approx(alone["hf_energy"], rel=1e-5)


def test_known_answers():
    flat = image_stats(np.full((3, 32, 32), 128, np.uint8))
    assert flat.saturation == flat.contrast == flat.colourfulness == flat.sharpness == flat.hf_energy == 0.0
    grey = (np.indices((64, 64)) // 2).sum(axis=0) % 2 * 255  # squares of 2 x 2 pixels
    board = image_stats(np.stack([grey] * 3).astype(np.uint8))
    assert board.hf_energy == pytest.approx(1.0) and board.contrast == pytest.approx(0.5)
    assert board.sharpness > 1e4 and board.brightness == pytest.approx(0.5)
    red = np.zeros((3, 8, 8), np.uint8)
    red[0] = 255
    assert image_stats(red).saturation == 1.0


def _pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB")).transpose(2, 0, 1)


def test_saturation_rises_and_a_checkerboard_raises_high_frequencies():
    im = base_picture(3, 0)
    sats = [image_stats(_pixels(saturated(f)(im, 0, 0))).saturation for f in (1.0, 1.4, 2.2, 3.0)]
    assert sats == sorted(sats) and sats[-1] > 1.5 * sats[0]
    plain, textured = image_stats(_pixels(im)), image_stats(_pixels(checkerboard(im, 0, 0)))
    assert textured.hf_energy > 10 * plain.hf_energy and textured.hf_energy > 0.3
