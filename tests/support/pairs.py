"""Pairs of images with a known preferred side, as eval reads them."""

from __future__ import annotations

import csv

PROMPTS = ["a red cat on a blue sofa", "an astronaut riding a horse", "a bowl of fruit"]


def write_csv(path, rows, labels):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "image_0", "image_1", "label"])
        for r, lab in zip(rows, labels):
            w.writerow([r["prompt"], r["image_0"], r["image_1"], lab])
    return str(path)
