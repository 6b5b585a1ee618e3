"""The HTML pages as a browser lays them out, at 1400 and at 420 px wide (a laptop and a phone): nothing wider than
the window, the comparison chart's points and whiskers on round ticks, the heat map's legend, each system's score
distribution, thumbnails big enough to see, and gallery cards that name a group's folder.

Chromium's window is never narrower than 500 px, so each page is laid out in an iframe exactly as wide as asked
(a `srcdoc` frame: the page as written, its Content-Security-Policy and script included); the harness around it
measures the frame's layout once it has loaded and writes that into its own DOM, which headless Chromium prints.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest

from pickrank.records import Record
from pickrank.report.gallery import HtmlReport
from tests.support.browser import Page, chromium, require_chromium
from tests.support.images import draw_image

MEASURE = """
var f=document.getElementById("f");
f.addEventListener("load",function(){
var d=f.contentDocument,root=d.documentElement;
function box(e){var r=e.getBoundingClientRect();return [r.left,r.top,r.width,r.height];}
function all(sel){return Array.prototype.map.call(d.querySelectorAll(sel),box);}
function texts(sel){return Array.prototype.map.call(d.querySelectorAll(sel),function(t){return t.textContent;});}
document.body.setAttribute("data-measure",JSON.stringify({
  ready:root.getAttribute("data-ready"), overflow:root.scrollWidth-root.clientWidth, width:root.clientWidth,
  points:all("svg.means circle.point"), whiskers:all("svg.means path.whisker"), ticks:texts("svg.means text"),
  means:all("svg.means"), legend:all("svg.heat g.legend"), dots:all("svg.dist circle.dot"),
  thumbs:all(".thumbs a"), thumbImgs:all(".thumbs img"), cards:all(".card a.th"), strips:all("svg.strip"),
  stripDots:all("svg.strip circle"), names:texts(".card .name")}));
});
"""

WIDTHS = (1400, 420)


def measure(tmp_path: Path, page_file: Path, width: int) -> dict:
    """The layout of `page_file` in a frame `width` px wide, as the harness measured it."""
    page_html = html.escape(page_file.read_text(encoding="utf-8"), quote=True)
    harness = page_file.with_name(f"harness-{width}-{page_file.name}")
    harness.write_text(f'<!DOCTYPE html><html><body style="margin:0"><iframe id="f" style="border:0;width:{width}px;'
                       f'height:1000px" srcdoc="{page_html}"></iframe><script>{MEASURE}</script></body></html>',
                       encoding="utf-8")
    dom = chromium(tmp_path, harness, f"--window-size={width + 100},1100", "--dump-dom")
    measured = json.loads(Page(dom).find("body")[0]["data-measure"])
    assert measured["ready"] == "1"  # the page's own script ran (its CSP allows it)
    return measured


def inside(inner: list[float], outer: list[float]) -> bool:
    return (inner[0] >= outer[0] - 1 and inner[0] + inner[2] <= outer[0] + outer[2] + 1
            and inner[1] >= outer[1] - 1 and inner[1] + inner[3] <= outer[1] + outer[3] + 1)


@pytest.mark.parametrize("width", WIDTHS)
def test_comparison_page_at_two_widths(page, tmp_path, width):  # noqa: F811
    require_chromium()
    root, out, table, result = page
    m = measure(tmp_path, out, width)
    assert m["overflow"] <= 0 and m["width"] == width  # nothing wider than the window: no sideways scrolling
    chart = m["means"][0]
    assert chart[0] >= 0 and chart[0] + chart[2] <= width
    # a point per system and its whisker, inside the chart, the whisker around its point
    assert len(m["points"]) == len(m["whiskers"]) == 3
    for point, whisker in zip(m["points"], m["whiskers"]):
        assert inside(point, chart) and inside(whisker, chart) and point[2] >= 8
        assert whisker[0] <= point[0] + point[2] / 2 <= whisker[0] + whisker[2]
    # round ticks: the axis labels are whole numbers or steps of 1, 2 or 5 in their last digit
    ticks = [float(t) for t in m["ticks"] if re.fullmatch(r"-?\d+(\.\d+)?", t)]
    steps = {round(b - a, 6) for a, b in zip(ticks, ticks[1:])}
    assert len(ticks) >= 3 and len(steps) == 1 and re.fullmatch(r"[125](0*|\.0)|0\.0*[125]", f"{steps.pop():g}")
    # the heat map's legend is drawn, inside the window; the distribution has a dot per prompt and system
    assert len(m["legend"]) == 1 and m["legend"][0][2] > 100 and m["legend"][0][0] + m["legend"][0][2] <= width
    assert len(m["dots"]) == 13
    # thumbnails big enough to see, at either width (they were 60 to 100 px)
    assert m["thumbs"] and min(t[2] for t in m["thumbs"]) >= 120 and min(t[3] for t in m["thumbImgs"]) >= 90


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    """A best-of-n gallery: three groups of four candidates named alike (cand0.png ... in each group)."""
    root = tmp_path_factory.mktemp("gallery")
    records = []
    for g in ("castle", "fruit", "a-group-with-a-rather-long-folder-name"):
        paths = [str(draw_image(root / "out" / g / f"cand{i}.png", (320, 240), seed=len(g) + i)) for i in range(4)]
        scores = [21.0 + ((len(g) * 3 + i * 5) % 7) * 0.37 for i in range(4)]
        order = sorted(range(4), key=lambda i: -scores[i])
        for rank, i in enumerate(order, 1):
            records.append(Record(prompt=f"a prompt for {g}", path=paths[i], score=scores[i], prob=0.25, rank=rank,
                                  group=g, prompt_source="prompt.txt"))
    out = root / "gallery.html"
    report = HtmlReport(str(out), kind="best-of-n", workers=0)
    report.write(records)
    report.close()
    return out


@pytest.mark.parametrize("width", WIDTHS)
def test_gallery_at_two_widths(gallery, tmp_path, width):
    require_chromium()
    m = measure(tmp_path, gallery, width)
    assert m["overflow"] <= 0 and m["width"] == width
    # each card says which group's folder its cand0.png is in
    assert len(m["names"]) == 12 and all(n.split("/")[0] in ("castle", "fruit") or n.startswith("a-group")
                                         for n in m["names"])
    assert {n.split("/")[1] for n in m["names"]} == {f"cand{i}.png" for i in range(4)}
    # a score strip per ranking, a dot per candidate, inside the window
    assert len(m["strips"]) == 3 and len(m["stripDots"]) == 12
    assert all(s[0] >= 0 and s[0] + s[2] <= width for s in m["strips"])
    assert min(c[2] for c in m["cards"]) >= 150  # the thumbnails' boxes
