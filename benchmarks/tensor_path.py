"""How far the batched on-device path (`PickScorer.score(..., preprocess="torch")`) is from the exact path.

Draws N images per size (shapes on a coloured background, some blurred), scores them both ways as a uint8
(N, 3, H, W) tensor, and prints the max and mean |difference| and the spread of the exact scores.

    python benchmarks/tensor_path.py --model .bench/pickscore-arch --n 4 --sizes 512x512,1024x768
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from pickrank import PickScorer


def drawn(size: tuple[int, int], seed: int) -> np.ndarray:
    """A deterministic picture as uint8 HWC; odd seeds are blurred (smooth content)."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", size, tuple(int(x) for x in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
        d.ellipse([x0, y0, x0 + int(rng.integers(1, size[0])), y0 + int(rng.integers(1, size[1]))],
                  fill=tuple(int(x) for x in rng.integers(0, 256, 3)))
    if seed % 2:
        im = im.filter(ImageFilter.GaussianBlur(3))
    return np.asarray(im)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--sizes", default="96x160,512x512,1000x700")
    args = ap.parse_args()
    scorer = PickScorer.from_pretrained(args.model, device="cpu")
    for spec in args.sizes.split(","):
        w, h = (int(v) for v in spec.split("x"))
        batch = torch.from_numpy(np.stack([drawn((w, h), s) for s in range(args.n)])).permute(0, 3, 1, 2)
        exact = scorer.score("a picture", batch.contiguous())
        fast = scorer.score("a picture", batch.contiguous(), preprocess="torch")
        diff = (exact - fast).abs()
        print(json.dumps({"size": spec, "n": args.n, "max_abs_diff": round(float(diff.max()), 6),
                          "mean_abs_diff": round(float(diff.mean()), 6),
                          "spread": round(float(exact.max() - exact.min()), 4)}))


if __name__ == "__main__":
    main()
