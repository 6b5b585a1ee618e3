"""Typos cost no model load: a missing path or a missing prompt is a usage error before the model is even looked
at, and the summary counts what could not be scored."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pickrank.cli.app import app
from tests.support.images import draw_image

NO_MODEL = ["--model", "/nonexistent/model-folder"]  # were it looked at, the run would fail with exit 1 instead


def with_prompt(path: Path, prompt: str) -> Path:
    """A PNG as Automatic1111 saves it: the prompt in its `parameters` text chunk."""
    draw_image(path, (120, 90), seed=len(prompt))
    info = PngInfo()
    info.add_text("parameters", f"{prompt}\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 120x90")
    Image.open(path).save(path, pnginfo=info)
    return path


def test_a_missing_path_is_a_usage_error_at_once(runner, images, tmp_path):
    for args in (["score", "-p", "x", str(images), str(tmp_path / "nonexist")],
                 ["score", str(tmp_path / "nonexist")],
                 ["batch", str(_csv(tmp_path)), str(tmp_path / "nonexist")]):
        res = runner.invoke(app, [*args, *NO_MODEL])
        assert res.exit_code == 2, res.output
        assert res.stderr.strip() == f"pickrank: error: no such file or folder: {tmp_path / 'nonexist'}"
    # a glob matching nothing is still "no images found" (and stdin's paths are read as they come)
    res = runner.invoke(app, ["score", "-p", "x", str(tmp_path / "*.png"), *NO_MODEL])
    assert res.exit_code == 2 and "no images found" in res.stderr


def _csv(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.csv"
    path.write_text("prompt\na red cat\n")
    return path


def test_no_prompt_anywhere_is_a_usage_error_before_the_model(runner, images, tmp_path):
    res = runner.invoke(app, ["score", str(images), *NO_MODEL])
    assert res.exit_code == 2, res.output
    assert "none of the 6 image(s) has one in its metadata" in res.stderr and "give --prompt TEXT" in res.stderr
    for g in ("g1", "g2"):
        draw_image(tmp_path / "out" / g / "cand0.png", (64, 64), seed=1)
    res = runner.invoke(app, ["best-of-n", str(tmp_path / "out"), *NO_MODEL])
    assert res.exit_code == 2, res.output
    assert "none of the 2 group(s) has a prompt" in res.stderr


def test_the_summary_counts_what_failed(runner, model_dir, tmp_path):
    with_prompt(tmp_path / "gen" / "a.png", "a red cat")
    draw_image(tmp_path / "gen" / "b.png", (80, 80), seed=3)  # no metadata
    res = runner.invoke(app, ["score", str(tmp_path / "gen"), "--model", str(model_dir), "-f", "jsonl",
                              "--no-cache"])
    assert res.exit_code == 3, res.output
    recs = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["error"] is None for r in recs] == [True, False]
    assert "pickrank: 2 image(s), 1 embedded, 0 from cache, 1 failed, 1 ranking(s)" in res.stderr


def test_prompts_says_when_best_of_n_would_use_prompt_txt(runner, tmp_path):
    draw_image(tmp_path / "out" / "g1" / "cand0.png", (64, 64), seed=1)
    (tmp_path / "out" / "g1" / "prompt.txt").write_text("a castle at dawn\n")
    draw_image(tmp_path / "out" / "g2" / "cand0.png", (64, 64), seed=2)
    res = runner.invoke(app, ["prompts", str(tmp_path / "out"), "-f", "jsonl"])
    assert res.exit_code == 0, res.output
    reasons = [json.loads(line)["reason"] for line in res.stdout.splitlines()]
    txt = tmp_path / "out" / "g1" / "prompt.txt"
    assert reasons == [f"no generation metadata; best-of-n would use {txt}", "no generation metadata"]
