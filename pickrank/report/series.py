"""The signals on the compare page (`compare --signals/--series --html`): the flags, line charts over the systems
(a series' checkpoints in order) with interval bands, the signals table, and a filmstrip per prompt (its first
sample in every system, in order). Inline SVG, everything from names and prompts escaped with `esc`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from pickrank.analysis.comparison import CompareResult, ScoreTable
from pickrank.analysis.comparison.watch import MONITOR, SIGNAL_NAMES, Estimate, Watch, relative_change
from pickrank.report.page import PageWriter, esc, number

LINE = "#2f6fde"  # the series' line (the screenshot test looks for it)
BAND = "#c9d8f6"  # its interval band
FLAG = "#b2182b"  # a flagged point

SERIES_CSS = """
.flags{background:#fff4f4;border:1px solid #f0c4c4;border-radius:8px;padding:8px 14px;margin:10px 0}
.flags li{overflow-wrap:anywhere}.flags.none{background:#f3faf3;border-color:#cfe8cf}
.lines{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,340px),1fr));gap:14px}
.lines figure{margin:0;background:var(--card);border:1px solid var(--line);border-radius:8px;padding:6px}
.lines svg{display:block;width:100%;height:auto}
.lines figcaption{font-size:12px;color:var(--mute)}
.film{display:flex;gap:6px;overflow-x:auto;padding-bottom:4px}
.film figure{margin:0;flex:0 0 128px;text-align:center;font-size:11px;color:var(--mute)}
.film figure img{width:128px;height:128px;object-fit:contain;background:#e9ecf1;display:block}
.film figcaption{overflow-wrap:anywhere}
"""


@dataclass(frozen=True)
class Line:
    """One chart: a value per system (None: none), its interval (low/high None: no band), flagged points."""

    id: str
    title: str
    values: tuple[float | None, ...]
    low: tuple[float | None, ...]
    high: tuple[float | None, ...]
    flagged: tuple[bool, ...]


def _from(estimates: Sequence[Estimate | None]) -> tuple[tuple, tuple, tuple]:
    return (tuple(e.mean if e else None for e in estimates), tuple(e.low if e else None for e in estimates),
            tuple(e.high if e else None for e in estimates))


def lines(result: CompareResult, watch: Watch) -> list[Line]:
    """The charts: mean PickScore, win rate against the baseline, each signal, and the held-out score."""
    names = [s.name for s in result.systems]
    flagged = {(f.system, f.signal) for f in watch.flags}
    none = tuple(False for _ in names)
    out = [Line("pickscore", "mean PickScore", tuple(s.mean for s in result.systems),
                tuple(s.low for s in result.systems), tuple(s.high for s in result.systems), none)]
    pairs = [None if n == result.baseline else result.pair(n, result.baseline) for n in names]
    out.append(Line("winrate", f"win rate vs {result.baseline}",
                    tuple(0.5 if n == result.baseline else p.win_rate if p else None for n, p in zip(names, pairs)),
                    tuple(p.win_low if p else None for p in pairs), tuple(p.win_high if p else None for p in pairs),
                    none))
    for sig in [*SIGNAL_NAMES, *([MONITOR] if watch.monitor_model else [])]:
        ests = [watch.system(n).monitor if sig == MONITOR else watch.system(n).get(sig) for n in names]
        title = "held-out score (CLIPScore)" if sig == MONITOR else sig.replace("_", " ")
        out.append(Line(sig, title, *_from(ests), tuple((n, sig) in flagged for n in names)))
    return out


def line_chart(line: Line, names: Sequence[str], width: int = 340, height: int = 200) -> str:
    """SVG: the values over the systems as a line with points, the interval as a band behind it, flagged points
    red; the y axis zoomed to the data."""
    known = [v for v in (*line.values, *line.low, *line.high) if v is not None]
    if not known:
        return f'<p class="empty">No {esc(line.title)}.</p>'
    lo, hi = min(known), max(known)
    pad = (hi - lo) * 0.08 or abs(hi) * 0.05 or 1.0
    lo, hi = lo - pad, hi + pad
    left, right, top, bottom = 52, 34, 22, 34  # room for the first and last names under their points
    n = len(names)

    def x(i: int) -> float:
        return left + (width - left - right) * (i / (n - 1) if n > 1 else 0.5)

    def y(v: float) -> float:
        return top + (height - top - bottom) * (hi - v) / (hi - lo)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="line" data-signal="{esc(line.id)}" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{esc(line.title)}">',
             f'<text x="{left}" y="14" font-size="12" fill="#1d2330">{esc(line.title)}</text>']
    for v in (lo + pad, hi - pad):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#dde1e7"/>'
                     f'<text x="{left - 4}" y="{y(v) + 4:.1f}" font-size="10" text-anchor="end" '
                     f'fill="#6a7282">{v:.3g}</text>')
    band = [(i, lw, hg) for i, (lw, hg) in enumerate(zip(line.low, line.high)) if lw is not None and hg is not None]
    if len(band) >= 2:
        path = " ".join(f"{x(i):.1f},{y(hg):.1f}" for i, _, hg in band) + " " + \
            " ".join(f"{x(i):.1f},{y(lw):.1f}" for i, lw, _ in reversed(band))
        parts.append(f'<polygon class="band" points="{path}" fill="{BAND}" fill-opacity=".7"/>')
    pts = [(i, v) for i, v in enumerate(line.values) if v is not None]
    if len(pts) >= 2:
        parts.append(f'<polyline class="series" points="{" ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in pts)}" '
                     f'fill="none" stroke="{LINE}" stroke-width="2"/>')
    for i, v in pts:
        flagged = line.flagged[i]
        parts.append(f'<circle class="pt{" flagged" if flagged else ""}" cx="{x(i):.1f}" cy="{y(v):.1f}" '
                     f'r="{6 if flagged else 4}" fill="{FLAG if flagged else LINE}"><title>{esc(names[i])}: '
                     f'{v:.4g}</title></circle>')
    for i, name in enumerate(names):
        short = name if len(name) <= 12 else name[:11] + "…"
        parts.append(f'<text x="{x(i):.1f}" y="{height - 16}" font-size="10" text-anchor="middle" '
                     f'fill="#6a7282">{esc(short)}<title>{esc(name)}</title></text>')
    return "".join(parts) + "</svg>"


def write_signals(page: PageWriter, table: ScoreTable, result: CompareResult, watch: Watch) -> None:
    """The page's signals section: flags, charts, the signals table."""
    names = [s.name for s in result.systems]
    what = "checkpoint" if watch.series else "system"
    page.w(f'<h2>Signals {"over the series" if watch.series else "beside the score"}</h2>\n')
    if watch.flags:
        page.w('<ul class="flags" id="flags">', "".join(f'<li data-system="{esc(f.system)}" '
                                                          f'data-signal="{esc(f.signal)}">{esc(f.text)}</li>'
                                                          for f in watch.flags), "</ul>\n")
    else:
        page.w('<ul class="flags none" id="flags"><li>No flag raised.</li></ul>\n')
    page.w('<div class="lines" id="lines">')
    for line in lines(result, watch):
        page.w(f'<figure>{line_chart(line, names)}</figure>')
    page.w(f'</div><p class="sub">Per {what}: the mean over prompts, the band its bootstrap interval; red points '
           'are flagged.</p>\n')
    base = watch.system(watch.baseline)
    page.w('<div class="scroll"><table class="sum" id="signals"><tr><th>system</th>',
           "".join(f"<th>{esc(n)}</th>" for n in SIGNAL_NAMES), "<th>diversity (all)</th>",
           "<th>held-out</th>" if watch.monitor_model else "", "</tr>\n")
    for s in watch.systems:
        cells = [_cell(s.get(n), base.get(n), s is base) for n in SIGNAL_NAMES] + [number(s.diversity_all)]
        if watch.monitor_model:
            cells.append(_cell(s.monitor, base.monitor, s is base))
        page.w(f'<tr data-system="{esc(s.name)}"><td>{esc(s.name)}</td>',
               "".join(f"<td>{esc(c)}</td>" for c in cells), "</tr>\n")
    page.w("</table></div>\n")


def _cell(e: Estimate | None, ref: Estimate | None, is_base: bool) -> str:
    if e is None or e.mean is None:
        return "-"
    change = None if is_base else relative_change(e.mean, ref.mean if ref else None)
    return number(e.mean) + ("" if change is None else f" ({change:+.0%})")


def write_filmstrips(page: PageWriter, table: ScoreTable) -> None:
    """One strip per prompt: its first scored sample in every system, in order, with the score."""
    page.w('<h2>Filmstrips</h2>\n<div id="filmstrips">')
    for row in table.prompts:
        page.w(f'<div class="prow" data-id="{esc(row.id)}"><h3><span class="tag">{esc(row.id)}</span>'
               f'{esc(row.prompt)}</h3><div class="film">')
        for name, samples in zip(table.systems, row.samples):
            first = next((x for x in samples if x.score is not None and x.path), None)
            img = None if first is None else page.thumb_img(os.path.realpath(first.path or ""),
                                                            f'alt="{esc(name)}" loading="lazy"')
            score = "-" if first is None else number(first.score, 2)
            page.w(f'<figure data-system="{esc(name)}">{img or "<span class=ph>no image</span>"}'
                   f"<figcaption>{esc(name)} {score}</figcaption></figure>")
        page.w("</div></div>\n")
    page.w("</div>\n")


__all__ = ["LINE", "BAND", "FLAG", "SERIES_CSS", "Line", "lines", "line_chart", "write_signals", "write_filmstrips"]
