"""Draw the images in sample_images/ (simple scenes that match, or don't match, a few prompts)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw


def sunset(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    for y in range(h // 2):
        t = y / (h / 2)
        d.line([(0, y), (w, y)], fill=(int(255 - 60 * t), int(120 + 60 * t), int(60 + 100 * t)))
    d.ellipse([w * 0.35, h * 0.3, w * 0.65, h * 0.6], fill=(255, 200, 40))
    d.rectangle([0, h // 2, w, h], fill=(20, 70, 140))
    for i in range(8):
        y = h // 2 + 10 + i * 14
        d.line([(w * 0.3 + i * 4, y), (w * 0.7 - i * 4, y)], fill=(255, 190, 80), width=2)


def red_apple(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.rectangle([0, 0, w, h], fill=(235, 225, 205))
    d.rectangle([0, h * 0.65, w, h], fill=(120, 80, 45))
    d.ellipse([w * 0.3, h * 0.3, w * 0.7, h * 0.72], fill=(200, 20, 30))
    d.line([(w * 0.5, h * 0.32), (w * 0.53, h * 0.2)], fill=(90, 60, 20), width=5)
    d.ellipse([w * 0.53, h * 0.18, w * 0.65, h * 0.26], fill=(40, 150, 40))


def green_tree(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.rectangle([0, 0, w, h], fill=(150, 200, 250))
    d.ellipse([-w * 0.2, h * 0.6, w * 1.2, h * 1.4], fill=(70, 160, 60))
    d.rectangle([w * 0.46, h * 0.4, w * 0.54, h * 0.68], fill=(100, 65, 30))
    d.ellipse([w * 0.28, h * 0.12, w * 0.72, h * 0.5], fill=(30, 120, 40))


def night_city(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.rectangle([0, 0, w, h], fill=(10, 10, 35))
    for i, x in enumerate(range(0, w, w // 7)):
        top = h * (0.3 + 0.25 * abs(math.sin(i * 1.7)))
        d.rectangle([x + 2, top, x + w // 7 - 2, h], fill=(40, 40, 60))
        for yy in range(int(top) + 6, h - 6, 14):
            for xx in range(x + 6, x + w // 7 - 8, 10):
                if (xx * 7 + yy * 3 + i) % 5 < 2:
                    d.rectangle([xx, yy, xx + 4, yy + 6], fill=(255, 220, 90))
    d.ellipse([w * 0.75, h * 0.06, w * 0.88, h * 0.19], fill=(240, 240, 220))


def blue_square(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.rectangle([0, 0, w, h], fill=(250, 250, 250))
    d.rectangle([w * 0.25, h * 0.25, w * 0.75, h * 0.75], fill=(30, 60, 200))


SCENES = {
    "sunset_over_the_sea.jpg": (sunset, (320, 240)),
    "red_apple_on_a_table.png": (red_apple, (256, 256)),
    "green_tree_on_a_hill.png": (green_tree, (240, 320)),
    "city_at_night.jpg": (night_city, (360, 240)),
    "blue_square.png": (blue_square, (200, 200)),
}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, (draw, size) in SCENES.items():
        im = Image.new("RGB", size)
        draw(ImageDraw.Draw(im), *size)
        im.save(out / name, quality=90) if name.endswith(".jpg") else im.save(out / name, optimize=True)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "sample_images"))
