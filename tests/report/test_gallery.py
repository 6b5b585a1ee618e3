"""The HTML gallery (--html, `pickrank report`): structure, rank order, escaping, embedded thumbnails, and a real
headless Chromium that renders the page, keeps the rank order and runs no injected script."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from pickrank.cli.app import app
from pickrank.records import Record
from pickrank.report.gallery import HtmlReport
from tests.support.browser import EVIL, Page, check_common, chromium, require_chromium
from tests.support.images import draw_image

PROMPT = EVIL + " a red cat"
EVIL_NAME = "q\"'<i id=pwned2>&amp;.png"  # a file name with markup, quotes and an entity in it




def invoke(args: list[str]):
    return CliRunner().invoke(app, args)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]




@pytest.fixture(scope="module")
def scored(tmp_path_factory, model_dir):
    """One `score --html` run (with a bad file and a hostile file name), its jsonl results and the page."""
    root = tmp_path_factory.mktemp("html")
    folder = root / "imgs"
    for i, size in enumerate([(300, 200), (201, 333), (224, 224), (97, 400), (640, 480)]):
        draw_image(folder / f"img{i}.{'png' if i % 2 else 'jpg'}", size, seed=i)
    draw_image(folder / EVIL_NAME, (120, 90), seed=7, fmt="PNG")
    (folder / "broken.png").write_bytes(b"not an image at all")
    out, results = root / "report.html", root / "results.jsonl"
    res = invoke(["score", "--prompt", PROMPT, "--model", str(model_dir), "--no-cache", "-q", "-f", "jsonl",
                  "-o", str(results), "--html", str(out), str(folder)])
    assert res.exit_code == 3, res.output  # the broken file: partial success
    return root, out, results


def test_score_page(scored, model_dir):
    root, out, results = scored
    text = out.read_text(encoding="utf-8")
    page = Page(text)
    check_common(page, text)
    rows = read_jsonl(results)
    ok = [r for r in rows if r["error"] is None]
    # Cards in rank order, the same order as the results, the winner marked.
    assert [c["data-path"] for c in page.cards] == [r["path"] for r in ok]
    assert [int(c["data-rank"]) for c in page.cards] == list(range(1, len(ok) + 1))
    assert "win" in page.cards[0]["class"].split() and not any("win" in c["class"] for c in page.cards[1:])
    # Every card has an embedded thumbnail: a JPEG about 256 px on the long side.
    imgs = page.find("img")
    assert len([i for i in imgs if i.get("src")]) == len(ok) == 6
    thumb = Image.open(io.BytesIO(base64.b64decode(imgs[0]["src"].split(",", 1)[1])))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256
    # The large view links the original by a path relative to the page.
    hrefs = [a["href"] for a in page.find("a", "th")]
    assert "imgs/img0.jpg" in hrefs and all(not h.startswith("/") for h in hrefs)
    # Escaping: the prompt and the file name are text, never markup.
    assert "&lt;script&gt;document.title=" in text and EVIL not in text
    assert PROMPT in page.text
    assert not [a for _, a in page.tags if a.get("id") in ("pwned", "pwned2")]
    assert EVIL_NAME in page.text and "<i id=pwned2>" not in text
    # The failed file with its reason, and the header.
    failed = [r for r in rows if r["error"]]
    assert len(failed) == 1 and failed[0]["path"].endswith("broken.png")
    assert "broken.png" in page.text and failed[0]["error"] in page.text
    meta = {a["data-k"]: a for a in page.find("dd")}
    assert set(meta) >= {"model", "revision", "dtype", "device", "pickrank", "date", "images ranked", "failed"}
    assert str(model_dir) in page.text and "float32" in page.text and "cpu" in page.text
    assert not [p for p in os.listdir(root) if p.endswith(".tmp")]


def test_report_from_saved_results(scored, tmp_path):
    root, out, results = scored
    again = root / "again.html"
    res = invoke(["report", str(results), "-o", str(again), "-q"])
    assert res.exit_code == 0, res.output
    direct, saved = Page(out.read_text()), Page(again.read_text())
    assert [c["data-path"] for c in saved.cards] == [c["data-path"] for c in direct.cards]
    assert [c["data-score"] for c in saved.cards] == [c["data-score"] for c in direct.cards]
    assert len([i for i in saved.find("img") if i.get("src")]) == 6
    assert "broken.png" in saved.text and "unknown" in saved.text  # meta is not in jsonl results
    # A file that is gone since: a placeholder, the page is still written.
    moved = root / "moved"
    shutil.copytree(root / "imgs", moved)
    rows = [dict(r, path=r["path"].replace(str(root / "imgs"), str(moved))) for r in read_jsonl(results)]
    os.unlink(moved / "img0.jpg")
    jsonl = tmp_path / "moved.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = invoke(["report", str(jsonl)])  # -o defaults to moved.html next to it
    assert res.exit_code == 0, res.output
    page = Page((tmp_path / "moved.html").read_text())
    assert len(page.cards) == 6 and len([i for i in page.find("img") if i.get("src")]) == 5
    assert page.find("span", "ph") and "no such file" in page.text


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("not json\n", "line 1: not JSON"),
    ("", "no results"),
    ('{"a": 1}\n', "not a pickrank result"),
    ('{"prompt": "x", "path": "a.png", "score": "high"}\n', "not a number"),
])
def test_report_bad_results_exit_2(tmp_path, content, message):
    path = tmp_path / "r.jsonl"
    if content is not None:
        path.write_text(content)
    res = invoke(["report", str(path), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 2
    assert res.stderr.startswith("pickrank: error: ") and message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()


def test_html_path_checked_before_model_load(tmp_path, images):
    # The model does not exist either: the --html problem must be reported first, without loading anything.
    res = invoke(["score", "-p", "a cat", "--model", str(tmp_path / "no-model"), "--no-cache",
                  "--html", str(tmp_path / "nope" / "r.html"), str(images)])
    assert res.exit_code == 1
    assert "--html" in res.stderr and "does not exist" in res.stderr
    res = invoke(["report", str(tmp_path / "x.jsonl"), "-o", str(tmp_path)])
    assert res.exit_code == 2  # the missing results come first
    (tmp_path / "x.jsonl").write_text('{"prompt": "p", "path": "a.png", "score": 1, "prob": 1, "rank": 1}\n')
    res = invoke(["report", str(tmp_path / "x.jsonl"), "-o", str(tmp_path / "nope" / "r.html")])
    assert res.exit_code == 1 and res.stderr.startswith("pickrank: error: -o ") and "does not exist" in res.stderr


def test_best_of_n_page(tmp_path, model_dir):
    folder = tmp_path / "runs"
    for g in ("cats", "dogs"):
        for i in range(3):
            draw_image(folder / g / f"{g}{i}.png", (160, 120), seed=hash(g) % 100 + i)
        (folder / g / "prompt.txt").write_text(f"a photo of {g} <b>bold</b>")
    draw_image(folder / "noprompt" / "x.png", (64, 64), seed=3)
    out = tmp_path / "best.html"
    res = invoke(["best-of-n", str(folder), "--top", "2", "--model", str(model_dir), "--no-cache", "-q",
                  "-f", "jsonl", "--copy-to", str(tmp_path / "keep"), "--html", str(out)])
    assert res.exit_code == 3, res.output  # the group without a prompt
    text = out.read_text()
    page = Page(text)
    check_common(page, text)
    sections = page.sections()
    assert [len(s) for s in sections] == [2, 2, 0]
    assert all([int(c["data-rank"]) for c in s] == [1, 2] for s in sections[:2])
    assert [t for t in page.find("span", "tag")] and "cats" in page.text and "noprompt" in page.text
    assert "&lt;b&gt;bold&lt;/b&gt;" in text and "<b>bold" not in text and "a photo of cats <b>bold</b>" in page.text
    assert "no prompt: give --prompt" in page.text and "copied to" in page.text


def test_batch_page_embeds_each_thumbnail_once(tmp_path, model_dir, images):
    csv = tmp_path / "prompts.csv"
    csv.write_text('id,prompt\n"<img src=x id=pwned3>",a red cat\nb2,a blue dog\n')
    out = tmp_path / "batch.html"
    res = invoke(["batch", str(csv), str(images), "--model", str(model_dir), "--no-cache", "-q", "-f", "jsonl",
                  "--html", str(out)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    text = out.read_text()
    page = Page(text)
    check_common(page, text)
    sections = page.sections()
    assert len(sections) == 2 and all(len(s) == 6 for s in sections)
    for s, rid in zip(sections, ["<img src=x id=pwned3>", "b2"]):
        assert [c["data-path"] for c in s] == [r["path"] for r in rows if r["id"] == rid]
    assert not [a for _, a in page.tags if a.get("id") == "pwned3"] and "&lt;img src=x" in text
    imgs = page.find("img")
    assert len([i for i in imgs if i.get("src")]) == 6  # each image once, referenced by the second prompt
    assert len([i for i in imgs if i.get("data-t")]) == 6


def test_pool_thumbnails_and_partial_page(tmp_path):
    """Many images: thumbnails come from worker processes; a closed report keeps what it received."""
    paths = [str(draw_image(tmp_path / f"p{i}.png", (300, 200), seed=i)) for i in range(10)]
    out = tmp_path / "pool.html"
    report = HtmlReport(str(out), kind="score", workers=1, inline_below=4)
    report.set_meta({"model": "m", "revision": None, "device": "cpu", "dtype": "float32"})
    report.write(tuple(Record(prompt="p", path=p, score=10.0 - i, prob=0.1, rank=i + 1)
                       for i, p in enumerate(paths)))
    assert report.thumbs.pool is not None
    report.close()  # as after Ctrl-C: whatever arrived is written
    page = Page(out.read_text())
    assert len([i for i in page.find("img") if i.get("src")]) == 10
    assert os.stat(out).st_mode & 0o777 == 0o644 & ~current_umask()
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(p) for p in paths] + ["pool.html"])


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- a real browser --------------------------------------------------------------------------------------









def test_browser_renders_page(scored, tmp_path):
    require_chromium()
    root, out, results = scored
    shot = tmp_path / "shot.png"
    chromium(tmp_path, out, "--window-size=1280,900", f"--screenshot={shot}")
    im = Image.open(shot).convert("RGB")
    assert im.size == (1280, 900)
    colours = im.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # text, thumbnails and bars: not a blank page
    # The thumbnails were painted: the area under the first card is not one flat colour.
    assert len(im.crop((25, 215, 210, 395)).getcolors(maxcolors=1 << 16) or ()) > 20

    dom = chromium(tmp_path, out, "--dump-dom")
    page = Page(dom)
    rows = [r for r in read_jsonl(results) if r["error"] is None]
    assert [c["data-path"] for c in page.cards] == [r["path"] for r in rows]  # rank order, as scored
    assert [int(c["data-rank"]) for c in page.cards] == list(range(1, 7))
    assert page.find("html")[0].get("data-ready") == "1"  # the page's own script ran (CSP allows it)...
    assert page.title == "pickrank score"  # ...the injected one did not
    assert not [a for _, a in page.tags if a.get("id") in ("pwned", "pwned2")]
    assert not [a for t, a in page.tags if t == "i" and a.get("id")]  # the file name's <i> stayed text
    assert PROMPT in page.text


@pytest.mark.timing
def test_browser_5000_images(tmp_path):
    """A 5,000-card page (few distinct files, so it builds fast) loads and runs its script in a few seconds."""
    require_chromium()
    paths = [str(draw_image(tmp_path / f"i{i}.jpg", (200, 150), seed=i)) for i in range(20)]
    out = tmp_path / "big.html"
    report = HtmlReport(str(out), kind="best-of-n", workers=0)
    for g in range(100):
        report.write(tuple(Record(prompt=f"prompt {g}", path=paths[(g + j) % 20], score=-j / 10, prob=0.02,
                                  rank=j + 1, group=f"g{g}") for j in range(50)))
    report.close()
    page = Page(out.read_text())
    thumbs = [i for i in page.find("img") if i.get("src") or i.get("data-t")]
    assert len(page.cards) == len(thumbs) == 5000 and all(i.get("loading") == "lazy" for i in thumbs)
    assert "content-visibility:auto" in out.read_text()
    start = time.monotonic()
    dom = chromium(tmp_path, out, "--dump-dom")
    assert time.monotonic() - start < 45
    assert 'data-ready="1"' in dom and dom.count('class="card') == 5000
