#!/usr/bin/env python
"""Case 3's baseline: a single-process decode-and-preprocess loop with the transformers processor, no model.

    python benchmarks/decode_loop.py MODEL_DIR FOLDER

For each *.jpg of FOLDER (sorted): Image.open + processor(images=img); the result is dropped. Prints the count.
"""

from __future__ import annotations

import os
import sys

from PIL import Image
from transformers import AutoProcessor


def main() -> int:
    model_dir, folder = sys.argv[1], sys.argv[2]
    processor = AutoProcessor.from_pretrained(model_dir)
    n = 0
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".jpg"):
            continue
        with Image.open(os.path.join(folder, name)) as img:
            processor(images=img, return_tensors="np")
        n += 1
    print(n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
