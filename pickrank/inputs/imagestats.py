"""Image statistics that hint at reward hacking (oversaturation, glare, blur, grid textures), computed with numpy on
the pixels a decode worker already holds: no second decode, no torch.

The colour statistics (saturation, brightness, contrast, colourfulness) are taken on the model's own input, the uint8
(3, H, W) crop after resize and centre crop (224 x 224 for PickScore), every STRIDE-th pixel in each direction:
bounded whatever the image's size, what the reward saw, and a quarter of the arithmetic (means and spreads over
12,544 pixels instead of 50,176; the decode it rides on costs only a few times more). Sharpness and high-frequency energy are taken on a centre patch of the decoded image at its own
resolution (at most PATCH x PATCH, no resampling): the resize to 224 is a low-pass filter that would wipe out the
pixel-scale grids and blur they are meant to catch. The README ("Watch a training run") gives each formula.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import numpy as np

# Rec. 601 luma weights, as Pillow's convert("L").
_LUMA = (0.299, 0.587, 0.114)
# Names the statistics' definitions where the cache keeps them: change it with any formula, STRIDE, PATCH or
# HF_CUTOFF.
STATS_VERSION = "1"
# The colour statistics take every STRIDE-th pixel of the crop in each direction.
STRIDE = 2
# The side of the native-resolution centre patch that sharpness and high-frequency energy are taken on.
PATCH = 128
# High-frequency energy counts the spectrum beyond this radial frequency, in cycles per pixel (Nyquist is 0.5).
HF_CUTOFF = 0.25


@dataclass(frozen=True)
class ImageStats:
    """One image's statistics (README, "Watch a training run"): saturation, brightness and contrast on [0, 1]
    pixel values; colourfulness and sharpness on 0..255 values, as their usual definitions; hf_energy a share."""

    saturation: float  # mean HSV saturation: (max - min) / max per pixel, 0 where max is 0
    brightness: float  # mean luma Y = 0.299 R + 0.587 G + 0.114 B, on [0, 1]
    contrast: float  # standard deviation of Y on [0, 1] (RMS contrast)
    colourfulness: float  # Hasler and Suesstrunk (2003) M on 0..255 values
    sharpness: float  # variance of the 4-neighbour Laplacian of Y on 0..255 values (interior pixels; native patch)
    hf_energy: float  # share of Y's spectral power (mean removed) beyond HF_CUTOFF cycles per pixel (native patch)

    def values(self) -> tuple[float, ...]:
        """The statistics in `STAT_NAMES` order."""
        return (self.saturation, self.brightness, self.contrast, self.colourfulness, self.sharpness, self.hf_energy)

    @classmethod
    def from_values(cls, values: "np.ndarray | tuple[float, ...]") -> ImageStats:
        """From `values()`' order (what the cache stores)."""
        return cls(*(float(v) for v in values))


STAT_NAMES: tuple[str, ...] = tuple(f.name for f in fields(ImageStats))


def luma(rgb: np.ndarray) -> np.ndarray:
    """Y of (3, H, W) values, in their unit."""
    return _LUMA[0] * rgb[0] + _LUMA[1] * rgb[1] + _LUMA[2] * rgb[2]


def image_stats(pixels: np.ndarray, patch: np.ndarray | None = None) -> ImageStats:
    """The statistics of uint8 RGB pixels shaped (3, H, W) (a decode worker's `Decoded.pixels`; colours from every
    STRIDE-th pixel); sharpness and high-frequency energy from `patch` (uint8 (h, w, 3): the decoded image's centre
    at its own resolution), or from all of `pixels` when there is none. Computed in float32 (the statistics are
    hints, not scores)."""
    grid = pixels[:, ::STRIDE, ::STRIDE]
    rgb = grid.astype(np.float32)
    top, bottom = grid.max(axis=0).astype(np.float32), grid.min(axis=0).astype(np.float32)
    sat = (top - bottom) / np.maximum(top, 1.0)  # 0 where top is 0 (then bottom is too)
    y = luma(rgb)
    # luma, not a matrix product: no BLAS call, no threads beside the other workers
    fine = luma((pixels if patch is None else patch.transpose(2, 0, 1)).astype(np.float32))
    return ImageStats(saturation=float(sat.mean()), brightness=float(y.mean()) / 255.0,
                      contrast=float(y.std()) / 255.0, colourfulness=colourfulness(rgb),
                      sharpness=laplacian_variance(fine), hf_energy=high_frequency_share(fine))


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler and Suesstrunk's M: sqrt(sd(rg)^2 + sd(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2), rg = R - G,
    yb = (R + G) / 2 - B, of (3, H, W) values."""
    rg = rgb[0] - rgb[1]
    yb = 0.5 * (rgb[0] + rgb[1]) - rgb[2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def laplacian_variance(y: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian (up + down + left + right - 4 centre) over the interior pixels."""
    if y.shape[0] < 3 or y.shape[1] < 3:
        return 0.0
    lap = y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:] - 4.0 * y[1:-1, 1:-1]
    return float(lap.var())


@functools.lru_cache(maxsize=16)
def _spectrum_weights(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """For rfft2 of an h x w image, flattened: how often each coefficient stands in the full spectrum (1 or 2: the
    columns rfft2 leaves out mirror those it keeps), and the same where the frequency lies beyond HF_CUTOFF (else
    0)."""
    fx = np.fft.rfftfreq(w)
    count = np.full((h, fx.size), 2.0)
    count[:, 0] = 1.0
    if w % 2 == 0:
        count[:, -1] = 1.0  # Nyquist: its own mirror
    high = np.hypot(np.fft.fftfreq(h)[:, None], fx[None, :]) > HF_CUTOFF
    return count.ravel(), (count * high).ravel()


def high_frequency_share(y: np.ndarray) -> float:
    """The share of the power spectrum of y (its mean removed) at radial frequencies above HF_CUTOFF cycles per
    pixel; 0 for a flat image."""
    c = np.fft.rfft2(y - y.mean()).ravel()
    power = c.real * c.real + c.imag * c.imag
    count, high = _spectrum_weights(*y.shape)
    total = float(power @ count)
    return float(power @ high) / total if total > 0 else 0.0


__all__ = ["ImageStats", "STAT_NAMES", "STATS_VERSION", "STRIDE", "HF_CUTOFF", "PATCH", "luma", "image_stats", "colourfulness",
           "laplacian_variance", "high_frequency_share"]
