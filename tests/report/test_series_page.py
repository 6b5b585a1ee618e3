"""The compare page with the signals (`report.series`): flags, line charts with interval bands (red points where
flagged), the signals table and a filmstrip per prompt, names escaped; laid out in headless Chromium at a laptop's
and a phone's width."""

from __future__ import annotations

import numpy as np
import pytest

from pickrank.analysis.comparison import ScoreTable, compare_systems
from pickrank.analysis.comparison.stats import PromptScores, Sample
from pickrank.analysis.comparison.watch import SIGNAL_NAMES, watch_signals
from pickrank.core.kept import Kept
from pickrank.inputs.decode import ImageSpec, decode_and_preprocess
from pickrank.report.comparison import write_html
from pickrank.report.series import BAND, FLAG, LINE
from tests.support.browser import EVIL_SYSTEM, Page, check_common, measure_in_frame, require_chromium
from tests.support.series import base_picture, saturated

STEPS = ("step_0", "step_20", "step_100", EVIL_SYSTEM)
FACTORS = (1.0, 1.4, 2.2, 3.0)
PROMPTS = 8


@pytest.fixture(scope="module")
def series_page(tmp_path_factory):
    """Four checkpoints of rising saturation and rising (made-up) scores, with real image statistics, on a page."""
    root = tmp_path_factory.mktemp("series")
    kept, rng, spec = Kept(), np.random.default_rng(0), ImageSpec()
    rows = []
    for p in range(PROMPTS):
        per_step = []
        for s, factor in enumerate(FACTORS):
            samples = []
            for k in range(2):
                path = root / f"s{s}" / f"{p}-{k}.png"
                path.parent.mkdir(exist_ok=True)
                saturated(factor)(base_picture(p, k), p, k).save(path)
                kept.name(str(path), str(path))
                emb = rng.normal(size=8)
                kept.put(str(path), emb / np.linalg.norm(emb), decode_and_preprocess("k", path.read_bytes(), spec,
                                                                                      stats=True).stats)
                samples.append(Sample(str(path), 20.0 + s * 0.3 + (p % 3) * 0.1 + k * 0.05))
            per_step.append(tuple(samples))
        rows.append(PromptScores(str(p), f"prompt {p}", tuple(per_step)))
    table = ScoreTable(STEPS, STEPS[0], tuple(rows))
    result = compare_systems(table, bootstrap=300, series=True)
    watch = watch_signals(table, result, kept, series=True)
    out = root / "series.html"
    write_html(str(out), table, result, meta={"model": "tiny"}, workers=0, watch=watch)
    return out, watch


def test_the_page_has_the_charts_flags_and_filmstrips(series_page):
    out, watch = series_page
    text = out.read_text(encoding="utf-8")
    page = Page(text)
    check_common(page, text)
    assert "pwned4" not in text.replace("&lt;b id=pwned4&gt;", "")  # the system name is escaped everywhere
    charts = page.find("svg", "line")
    assert [c["data-signal"] for c in charts] == ["pickscore", "winrate", *SIGNAL_NAMES]
    assert watch.flags and len(page.find("li")) >= len(watch.flags)
    assert any(f.signal == "saturation" for f in watch.flags)
    assert len(page.find("div", "film")) == PROMPTS and LINE in text and BAND in text and FLAG in text


MEASURE = """
  lines:all("svg.line"), bands:all("svg.line polygon.band"), series:all("svg.line polyline.series"),
  points:all("svg.line circle.pt"), flagged:all("svg.line circle.flagged"), film:all(".film figure img"),
  flags:all("#flags li")"""


@pytest.mark.parametrize("width", (1400, 420))
def test_the_series_page_in_chromium(series_page, tmp_path, width):
    require_chromium()
    out, watch = series_page
    m = measure_in_frame(tmp_path, out, width, MEASURE)
    assert m["overflow"] <= 0
    assert len(m["lines"]) == 2 + len(SIGNAL_NAMES)
    for chart in m["lines"]:
        assert chart[2] > 250 and chart[0] >= 0 and chart[0] + chart[2] <= width
    assert len(m["bands"]) == len(m["lines"])  # every chart has its interval band
    assert len(m["series"]) == len(m["lines"]) and len(m["points"]) == 4 * len(m["lines"])
    assert len(m["flagged"]) == sum(1 for f in watch.flags if f.signal != "monitor")
    assert len(m["film"]) == 4 * PROMPTS and min(f[2] for f in m["film"]) >= 100
    assert len(m["flags"]) == len(watch.flags)
