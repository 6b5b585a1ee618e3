"""The `compare --html` page: structure, escaping, charts, thumbnails once each, and a real headless Chromium that
draws the chart, runs only the page's script and sorts the prompt rows."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from pickrank.analysis.comparison import (
    per_prompt_rows,
    prompt_scores,
)
from pickrank.errors import OutputError
from pickrank.report.comparison import BAR, HEAT_HIGH, HEAT_LOW, write_html
from tests.support.browser import CHROMIUM_FLAGS, EVIL, EVIL_SYSTEM, Page, check_common, require_chromium


def test_page_structure_and_escaping(page):
    root, out, table, result = page
    text = out.read_text(encoding="utf-8")
    doc = Page(text)
    check_common(doc, text)
    assert '<meta http-equiv="Content-Security-Policy"' in text
    assert EVIL not in text and "&lt;script&gt;" in text and EVIL_SYSTEM not in text
    assert not [a for _, a in doc.tags if a.get("id") in ("pwned", "pwned4")]
    assert f"{EVIL} prompt 1" in doc.text and EVIL_SYSTEM in doc.text
    # Summary: one row per system; charts: one point per system with its whisker, a dot per prompt and system, a
    # 3x3 heat map with its legend.
    assert [r["data-system"] for r in doc.find("tr") if r.get("data-system")] == list(table.systems)
    points = doc.find("circle", "point")
    assert len(points) == 3 and {b["fill"] for b in points} == {BAR, "#8e99ad"}
    assert len(doc.find("path", "whisker")) == 3 and len(doc.find("rect", "cell")) == 9
    scored = sum(v is not None for row in table.prompts for v in prompt_scores(row))
    assert len(doc.find("circle", "dot")) == scored == 13  # grpo has no prompt 5, dpo's prompt 4 failed
    assert len(doc.find("g", "legend")) == 1 and len(doc.find("rect", "iqr")) == 3
    # One row per prompt; the winner marked as in the per-prompt results.
    rows = doc.find("div", "prow")
    assert [r["data-id"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert [r["data-winner"] or None for r in rows] == [p["winner"] for p in per_prompt_rows(table)]
    assert len([d for d in doc.find("div", "sys") if "win" in d["class"].split()]) == \
        sum(1 for r in rows if r["data-winner"])
    # Thumbnails: each distinct file once (the shared image is referenced the second time), the bad one a reason.
    imgs = doc.find("img")
    assert len([i for i in imgs if i.get("src")]) == len({r.path for r in _scored(table)}) - 1
    assert len([i for i in imgs if i.get("data-t")]) == 1
    assert "failed: not an image" in doc.text and "no image" in doc.text
    assert "Left out" in doc.text and "grpo has no scored image for 1 prompt(s): 5" in doc.text
    assert "Best of k" not in doc.text and not result.best_of_k  # one sample on most prompts: no curve


def _scored(table):
    return [x for row in table.prompts for samples in row.samples for x in samples if x.score is not None]


def test_unwritable_page_is_an_output_error(page, tmp_path):
    root, out, table, result = page
    with pytest.raises(OutputError, match="--html"):
        write_html(str(tmp_path / "no" / "x.html"), table, result, workers=0)


def browse(tmp_path: Path, url: str, *args: str) -> str:
    exe = require_chromium()
    profile = tmp_path / f"profile-{time.monotonic_ns()}"
    proc = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_browser_draws_the_chart_and_sorts(page, tmp_path):
    require_chromium()
    root, out, table, result = page
    shot = tmp_path / "shot.png"
    browse(tmp_path, out.as_uri(), "--window-size=1280,900", f"--screenshot={shot}")
    im = Image.open(shot).convert("RGB")
    bar = tuple(int(BAR[i:i + 2], 16) for i in (1, 3, 5))
    # The points are drawn: pixels of exactly their colour in the upper part of the page, where the charts are.
    colours = dict((c, n) for n, c in im.crop((0, 0, 1280, 900)).getcolors(maxcolors=1 << 20))
    assert colours.get(bar, 0) > 100, sorted(colours.items(), key=lambda x: -x[1])[:5]
    assert colours.get(HEAT_HIGH, 0) > 2000 and colours.get(HEAT_LOW, 0) > 2000  # and the heat map's cells
    dom = browse(tmp_path, out.as_uri(), "--dump-dom")
    doc = Page(dom)
    assert doc.find("html")[0].get("data-ready") == "1" and "<title>pickrank compare</title>" in dom
    assert not [a for _, a in doc.tags if a.get("id") in ("pwned", "pwned4")]
    assert [r["data-id"] for r in doc.find("div", "prow")] == ["1", "2", "3", "4", "5"]
    # The order a link asks for: most lopsided first (largest top-two margin).
    dom = browse(tmp_path, out.as_uri() + "#sort=-data-margin", "--dump-dom")
    rows = Page(dom).find("div", "prow")
    margins = [float(r["data-margin"]) for r in rows]
    assert margins == sorted(margins, reverse=True) and [r["data-id"] for r in rows] != ["1", "2", "3", "4", "5"]
