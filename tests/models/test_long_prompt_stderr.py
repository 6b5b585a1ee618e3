"""A prompt over 77 tokens: pickrank's one warning says it is truncated, and the tokenizer's own "longer than the
maximum" warning (which says the opposite) does not reach stderr, now that transformers' log level is left as the
process had it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_only_pickrank_speaks_about_a_long_prompt(model_dir: Path, images: Path) -> None:
    prompt = "a castle at dawn over a quiet sea " * 20
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, "-m", "pickrank", "score", "-p", prompt, str(images), "--model",
                          str(model_dir), "--no-cache", "--workers", "0", "-f", "jsonl"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert all(line.startswith("pickrank: ") for line in lines), lines
    assert sum("truncated as the reference does" in line for line in lines) == 1
