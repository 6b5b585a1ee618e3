"""`pickrank compare` through the real CLI and the tiny real model: known answers, the three layouts, failed images,
usage errors before the model loads, the outputs, and the cache across runs."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import pytest

from pickrank.cli.app import app
from pickrank.cli.compare import compare
from pickrank.cli.shared import SHARED
from pickrank.options import DatasetOptions
from tests.support.help import assert_shared_options_once
from tests.support.images import draw_image

PROMPTS = ["a red cat", "a blue dog", "a green bird", "a yellow car"]


def run(runner, *args: str, model: Path | str | None = None, cache: Path | None = None):
    """compare with the tiny model on the CPU, no decode workers; its own cache file unless told."""
    extra = ["--model", str(model)] if model is not None else []
    extra += ["--cache", str(cache)] if cache is not None else ["--no-cache"]
    return runner.invoke(app, ["compare", *args, *extra, "--device", "cpu", "--workers", "0", "--bootstrap", "500"])


def as_json(res) -> dict:
    assert res.exit_code in (0, 3), res.output
    return json.loads(res.stdout)


def write_prompts(path: Path, prompts: list[str], ids: bool = True) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt"] if ids else ["prompt"])
        w.writerows([[i, p] for i, p in enumerate(prompts, start=1)] if ids else [[p] for p in prompts])
    return path


def two_samples(root: Path, system: str, seed: int, n: int = 4) -> Path:
    """A system folder of n prompts, two samples each (subfolders 1/ .. n/)."""
    for i in range(1, n + 1):
        for j in range(2):
            draw_image(root / system / str(i) / f"{j}.png", (48, 40), seed=seed * 100 + i * 10 + j)
    return root / system


def test_help_names_the_layouts_and_lists_each_shared_option_once(runner, monkeypatch):
    # compare has its own -f and --html; its JSON carries the provenance without --with-meta; it reads no shards
    takes = [n for n, (bundle, _, _) in SHARED.items()
             if n not in ("format", "html", "null", "with_meta") and bundle is not DatasetOptions]
    assert_shared_options_once(runner, monkeypatch, ("compare",), compare, takes)
    text = runner.invoke(app, ["compare", "--help"]).stdout
    for layout in ("prompts-csv", "paired-folders", "manifest"):
        assert f"  {layout}  " in text
    assert "$ pickrank compare" in text


def test_identical_systems_win_half_diff_zero_p_one(runner, model_dir, tmp_path):
    a = two_samples(tmp_path, "a", seed=1)
    shutil.copytree(a, tmp_path / "b")
    prompts = write_prompts(tmp_path / "p.csv", PROMPTS)
    data = as_json(run(runner, str(a), str(tmp_path / "b"), "--prompts", str(prompts), "-f", "json",
                       model=model_dir))
    p = data["pairs"][0]
    assert (p["system"], p["reference"]) == ("b", "a")
    assert p["win_rate"] == 0.5 and p["win_low"] == p["win_high"] == 0.5
    assert p["mean_diff"] == 0.0 and p["p_value"] == 1.0 and (p["wins"], p["ties"], p["losses"]) == (0, 4, 0)
    assert data["systems"][0]["mean"] == data["systems"][1]["mean"]
    assert data["model"]["model"] == str(model_dir) and data["model"]["device"] == "cpu"  # provenance
    assert data["settings"]["layout"] == "prompts-csv" and data["settings"]["bootstrap"] == 500


def test_a_system_of_the_others_best_sample_wins_every_prompt(runner, model_dir, tmp_path):
    a = two_samples(tmp_path, "a", seed=2)
    rows = write_prompts(tmp_path / "p.csv", PROMPTS)
    first = tmp_path / "rows.jsonl"
    res = run(runner, str(a), str(a), "--names", "a,a2", "--prompts", str(rows), "--per-prompt", str(first), "-q",
              model=model_dir)
    assert res.exit_code == 0, res.output
    best = tmp_path / "best"
    for line in first.read_text().splitlines():
        r = json.loads(line)
        top = max(r["samples"]["a"], key=lambda x: x["score"])
        assert top["score"] > min(x["score"] for x in r["samples"]["a"])  # distinct samples: best > mean
        best.mkdir(exist_ok=True)
        shutil.copy(top["path"], best / f"{r['id']}.png")
    data = as_json(run(runner, str(a), str(best), "--prompts", str(rows), "-f", "json", model=model_dir))
    p = data["pairs"][0]
    assert (p["system"], p["win_rate"], p["wins"], p["losses"]) == ("best", 1.0, 4, 0) and p["mean_diff"] > 0


def test_hand_checked_four_prompts_one_tie_one_missing(runner, model_dir, tmp_path):
    """a: one image per prompt; b: prompt 1 is a's very image (a tie), prompt 4 has no image (left out)."""
    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(1, 5):
        draw_image(a / f"{i}.png", (48, 40), seed=i)
    (b).mkdir()
    shutil.copy(a / "1.png", b / "1.png")  # the same picture: the same score, an exact tie
    draw_image(b / "2.png", (48, 40), seed=20)
    draw_image(b / "3.png", (40, 48), seed=30)
    prompts = write_prompts(tmp_path / "p.csv", PROMPTS)
    rows = tmp_path / "rows.jsonl"
    res = run(runner, str(a), str(b), "--prompts", str(prompts), "-f", "json", "--per-prompt", str(rows), "-v",
              model=model_dir)
    data = as_json(res)
    assert res.exit_code == 0
    scores = {r["id"]: r["scores"] for r in map(json.loads, rows.read_text().splitlines())}
    # By hand from the per-prompt scores: prompt 1 a tie (0.5), prompts 2 and 3 won or lost, 4 left out.
    d = [scores[i]["b"] - scores[i]["a"] for i in ("1", "2", "3")]
    assert d[0] == 0.0 and scores["4"]["b"] is None
    wins, losses = sum(x > 0 for x in d), sum(x < 0 for x in d)
    p = data["pairs"][0]
    assert (p["prompts"], p["wins"], p["ties"], p["losses"]) == (3, wins, 1, losses)
    assert p["win_rate"] == pytest.approx((wins + 0.5) / 3)
    assert p["mean_diff"] == pytest.approx(sum(d) / 3)
    assert p["pref_prob"] == pytest.approx(sum(1 / (1 + math.exp(-x)) for x in d) / 3)
    assert p["p_value"] == pytest.approx(min(1.0, 2 * sum(math.comb(2, k) for k in range(min(wins, losses) + 1))
                                             / 4))
    sa, sb = data["systems"]
    assert (sa["prompts"], sa["images"], sb["prompts"], sb["images"], sb["missing"]) == (4, 4, 3, 3, ["4"])
    assert sb["mean"] == pytest.approx(sum(scores[i]["b"] for i in ("1", "2", "3")) / 3)
    assert "layout: prompts-csv" in res.stderr
    assert "b: 1 prompt(s) without a scored image, left out of its pairs: 4" in res.stderr
    quiet_names = run(runner, str(a), str(b), "--prompts", str(prompts), model=model_dir)
    assert "(-v names them)" in quiet_names.stderr and "pairs: 4" not in quiet_names.stderr


def test_the_three_layouts_give_the_same_numbers(runner, model_dir, tmp_path):
    a, b = two_samples(tmp_path, "base", seed=3), two_samples(tmp_path, "dpo", seed=4)
    draw_image(a / "5.png", (48, 40), seed=55)  # one prompt with one sample, only in base
    prompts = PROMPTS + ["a white boat"]
    for folder in (a, b):
        for i in range(1, 5):
            (folder / str(i) / "prompt.txt").write_text(prompts[i - 1] + "\n")
    csv_path = write_prompts(tmp_path / "p.csv", prompts, ids=False)  # ids: the row numbers
    manifest = tmp_path / "m.jsonl"
    rows = [{"system": s.name, "id": str(i), "prompt": prompts[i - 1], "image": os.path.relpath(p, tmp_path)}
            for s in (a, b) for i in range(1, 6)
            for p in sorted((s / str(i)).glob("*.png")) + ([s / f"{i}.png"] if (s / f"{i}.png").exists() else [])]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path / "c.sqlite3"
    by_csv = as_json(run(runner, str(a), str(b), "--prompts", str(csv_path), "-f", "json", model=model_dir,
                         cache=cache))
    (a / "5.png").unlink()  # paired folders: a lone image needs a prompt; drop it (and from the others too)
    (a / "5").mkdir()
    draw_image(a / "5" / "0.png", (48, 40), seed=55)
    (a / "5" / "prompt.txt").write_text(prompts[4])
    by_path = as_json(run(runner, str(a), str(b), "-f", "json", model=model_dir, cache=cache))
    manifest.write_text(manifest.read_text().replace("base/5.png", "base/5/0.png"))
    by_manifest = as_json(run(runner, "--manifest", str(manifest), "-f", "json", model=model_dir, cache=cache))
    assert [d["settings"]["layout"] for d in (by_csv, by_path, by_manifest)] == \
        ["prompts-csv", "paired-folders", "manifest"]
    for key in ("systems", "pairs", "prompts"):
        assert by_csv[key] == by_path[key] == by_manifest[key], key
    assert by_csv["systems"][1]["missing"] == ["5"] and by_csv["pairs"][0]["prompts"] == 4


def test_a_bad_image_is_counted_and_exits_3(runner, model_dir, tmp_path):
    a, b = two_samples(tmp_path, "a", seed=5), two_samples(tmp_path, "b", seed=6)
    (b / "2" / "1.png").write_bytes(b"not an image")
    prompts = write_prompts(tmp_path / "p.csv", PROMPTS)
    out = tmp_path / "s.csv"
    res = run(runner, str(a), str(b), "--prompts", str(prompts), "-o", str(out), model=model_dir)
    assert res.exit_code == 3, res.output
    assert "pickrank: warning: " in res.stderr and "1.png" in res.stderr
    rows = list(csv.DictReader(out.open()))  # -o's extension: csv; the output of a partial run is kept
    assert [(r["kind"], r["system"], r["images"], r["failed"]) for r in rows[:2]] == \
        [("system", "a", "8", "0"), ("system", "b", "7", "1")]
    assert rows[2]["prompts"] == "4"  # prompt 2 still has b's other sample
    table = run(runner, str(a), str(b), "--prompts", str(prompts), "-f", "table", model=model_dir)
    assert table.exit_code == 3 and "7 (1 failed)" in table.stdout


@pytest.mark.parametrize("args, message", [
    (["a"], "at least two"),
    (["a", "nope"], "not a folder"),
    (["a", "b", "--prompts", "p.csv", "--names", "x"], "--names gives 1 name(s) for 2 systems"),
    (["a", "b", "--prompts", "p.csv", "--baseline", "zz"], "--baseline 'zz'"),
    (["a", "b", "--manifest", "p.csv"], "either --manifest or"),
    (["a", "b", "--prompts", "missing.csv"], "missing.csv"),
    (["a", "b"], "no prompt has images"),  # paired folders without any prompt
    (["a", "b", "--prompts", "p.csv", "-o", "x.jsonl"], "--per-prompt"),
    (["a", "b", "--prompts", "p.csv", "-o", "same.json", "--html", "same.json"], "same file"),
    (["a", "b", "--prompts", "p.csv", "--html", "no/such/x.html"], "--html no/such/x.html: folder"),  # exit 1
    (["a", "b", "--prompts", "p.csv", "--per-prompt", "p.csv"], "is also an input"),
])
def test_bad_layout_or_outputs_exit_2_before_the_model_loads(runner, tmp_path, monkeypatch, args, message):
    draw_image(tmp_path / "a" / "1.png", (16, 16), seed=1)
    draw_image(tmp_path / "b" / "1.png", (16, 16), seed=2)
    write_prompts(tmp_path / "p.csv", ["x"])
    before = (tmp_path / "p.csv").read_bytes()
    monkeypatch.chdir(tmp_path)
    res = run(runner, *args, model=tmp_path / "no-such-model")
    assert res.exit_code == (1 if "no/such/x.html" in args else 2), res.output  # an unwritable output: exit 1, as elsewhere
    last = res.stderr.splitlines()[-1]  # after any warnings (a slot without a prompt), one error line
    assert last.startswith("pickrank: error: ") and message in last, res.stderr
    assert "no-such-model" not in res.stderr  # refused before the model was looked at
    assert "Traceback" not in res.output and (tmp_path / "p.csv").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "p.csv"]  # nothing written


def test_html_and_per_prompt_outputs(runner, model_dir, tmp_path):
    a, b = two_samples(tmp_path, "a", seed=7), two_samples(tmp_path, "b", seed=8)
    prompts = write_prompts(tmp_path / "p.csv", PROMPTS)
    page, rows, summary = tmp_path / "cmp.html", tmp_path / "rows.jsonl", tmp_path / "sum.json"
    res = run(runner, str(a), str(b), "--prompts", str(prompts), "--html", str(page), "--per-prompt", str(rows),
              "-o", str(summary), "--all-pairs", "--best-of-n", model=model_dir)
    assert res.exit_code == 0, res.output
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "Content-Security-Policy" in text and 'class="prow"' in text
    lines = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [r["id"] for r in lines] == ["1", "2", "3", "4"]
    assert all(set(r) == {"id", "prompt", "scores", "samples", "winner"} for r in lines)
    assert lines[0]["prompt"] == PROMPTS[0] and len(lines[0]["samples"]["b"]) == 2
    data = json.loads(summary.read_text())  # -o x.json: json
    assert data["settings"]["all_pairs"] and len(data["best_of_k"]) == 2 and data["best_of_k"][0]["ks"] == [1, 2]
    table = run(runner, str(a), str(b), "--prompts", str(prompts), "--all-pairs", "--best-of-n", model=model_dir)
    assert "win rate of row over column" in table.stdout and "best-of-k win rate" in table.stdout
    assert table.stdout.count("best-of-k win rate") == 1  # one table, a row per ordered pair
    assert "mean 95% CI" in table.stdout and "win 95% CI" in table.stdout  # the two intervals named apart


def test_a_failed_run_keeps_earlier_outputs(runner, model_dir, tmp_path):
    a, b = two_samples(tmp_path, "a", seed=9), two_samples(tmp_path, "b", seed=10)
    (b / "3" / "0.png").write_bytes(b"broken")
    prompts = write_prompts(tmp_path / "p.csv", PROMPTS)
    out, rows = tmp_path / "old.json", tmp_path / "old.jsonl"
    out.write_text("earlier\n")
    rows.write_text("earlier rows\n")
    res = run(runner, str(a), str(b), "--prompts", str(prompts), "-o", str(out), "--per-prompt", str(rows),
              "--on-error", "fail", model=model_dir)
    assert res.exit_code == 1 and "0.png" in res.stderr
    assert out.read_text() == "earlier\n" and rows.read_text() == "earlier rows\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "old.json", "old.jsonl", "p.csv"]


def test_control_characters_in_names_are_escaped_on_the_terminal_table(runner, model_dir, tmp_path):
    a, b = two_samples(tmp_path, "a", seed=11), two_samples(tmp_path, "b", seed=12)
    prompts = write_prompts(tmp_path / "p.csv", PROMPTS)
    res = run(runner, str(a), str(b), "--prompts", str(prompts), "--names", "a,\x1b[31mred", model=model_dir)
    assert res.exit_code == 0 and "\x1b" not in res.stdout and "\\x1b[31mred" in res.stdout


def test_a_third_system_embeds_only_its_images(runner, model_dir, tmp_path, count_embeds):
    a, b, c = (two_samples(tmp_path, s, seed=20 + i) for i, s in enumerate("abc"))
    prompts = write_prompts(tmp_path / "p.csv", PROMPTS)
    cache = tmp_path / "c.sqlite3"
    first = run(runner, str(a), str(b), "--prompts", str(prompts), model=model_dir, cache=cache)
    assert first.exit_code == 0, first.output
    assert sum(count_embeds) == 16  # 2 systems x 4 prompts x 2 samples, each once
    count_embeds.clear()
    again = run(runner, str(a), str(b), str(c), "--prompts", str(prompts), "-f", "json", model=model_dir,
                cache=cache)
    assert sum(count_embeds) == 8, count_embeds  # only c's
    assert "8 embedded, 16 from cache" in again.stderr
    assert [s["name"] for s in as_json(again)["systems"]] == ["a", "b", "c"]


def test_an_interrupted_run_leaves_earlier_outputs_as_they_were(model_dir, tmp_path):
    """SIGTERM once the model has loaded (the outputs are open by then): exit 143, and the -o and
    --per-prompt files of an earlier run are not replaced by an empty or partial comparison."""
    import signal
    import subprocess
    import sys

    a, b = two_samples(tmp_path, "a", seed=30, n=40), two_samples(tmp_path, "b", seed=31, n=40)
    prompts = write_prompts(tmp_path / "p.csv", [f"prompt {i}" for i in range(1, 41)])
    out, rows = tmp_path / "old.json", tmp_path / "old.jsonl"
    out.write_text("earlier\n")
    rows.write_text("earlier rows\n")
    proc = subprocess.Popen([sys.executable, "-m", "pickrank", "compare", str(a), str(b), "--prompts", str(prompts),
                             "-o", str(out), "--per-prompt", str(rows), "--model", str(model_dir), "--device", "cpu",
                             "--workers", "0", "--no-cache"], stderr=subprocess.PIPE, text=True)
    try:
        seen = [proc.stderr.readline() for _ in range(2)]  # the layout, then the model loaded: outputs are open
        assert "layout: prompts-csv" in seen[0] and "on cpu" in seen[1], seen
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert out.read_text() == "earlier\n" and rows.read_text() == "earlier rows\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "old.json", "old.jsonl", "p.csv"]
