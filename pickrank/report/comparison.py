"""The `pickrank compare --html` page: one self-contained file, built as the gallery is (pickrank.report.page).

The summary table; the means as points with interval whiskers on round ticks, each system's distribution of
per-prompt scores, and a win-rate heat map with its legend, all inline SVG drawn here (scaled down on narrow
screens); then one row per prompt with each system's images side by side, the winner marked, sortable by the score
difference. No network, everything from prompts, names and paths escaped with `esc`, a CSP that lets
only the page's own script run, thumbnails embedded once each as base64 JPEG.
"""

from __future__ import annotations

import math
import os
from typing import IO, Sequence

from pickrank import __version__
from pickrank.analysis.comparison import (
    CompareResult,
    PromptScores,
    Sample,
    ScoreTable,
    prompt_scores,
    win_matrix,
    winner,
)
from pickrank.analysis.comparison.render import caveat_note, marked
from pickrank.report.page import (
    HEADER_CSS,
    PageWriter,
    Thumbnails,
    esc,
    header_meta,
    interval,
    number,
    page_head,
    page_script,
    write_page,
)

BAR = "#2f6fde"  # the systems' points (the screenshot test looks for it)
BASE_BAR = "#8e99ad"  # the baseline's
HEAT_HIGH, HEAT_LOW = (33, 102, 172), (178, 24, 43)  # win rate 1 and 0 (not the bars' colour)

_CSS = """
:root{--bg:#f4f5f7;--card:#fff;--ink:#1d2330;--mute:#6a7282;--line:#dde1e7;--acc:#2f6fde;--win:#e0a800}
""" + HEADER_CSS + """main{padding:6px 20px 40px}
h2{font-size:16px;margin:20px 0 8px}
.scroll{max-width:100%;overflow-x:auto}
table.sum{border-collapse:collapse;background:var(--card);font-variant-numeric:tabular-nums}
table.sum th,table.sum td{border:1px solid var(--line);padding:5px 10px;text-align:right}
table.sum th:first-child,table.sum td:first-child{text-align:left}
table.sum tr.base td{color:var(--mute)}
.charts{display:flex;flex-wrap:wrap;gap:20px;align-items:flex-start;margin-top:16px}
.charts figure{margin:0;background:var(--card);border:1px solid var(--line);border-radius:8px;padding:8px;
max-width:100%}
.charts svg{display:block;max-width:100%;height:auto}
.charts figcaption{font-size:12px;color:var(--mute);margin-top:4px;max-width:520px}
.tools{position:sticky;top:0;z-index:5;display:flex;flex-wrap:wrap;gap:6px 10px;align-items:center;padding:8px 0;
background:rgba(244,245,247,.95);border-bottom:1px solid var(--line)}
.tools select{padding:5px;border:1px solid #c5ccd6;border-radius:6px;font:inherit;max-width:100%}
.prow{background:var(--card);border:1px solid var(--line);border-radius:8px;margin:12px 0;padding:8px 10px;
content-visibility:auto;contain-intrinsic-size:auto 300px}
.prow h3{font-size:14px;margin:0 0 6px;white-space:pre-wrap;overflow-wrap:anywhere}
.prow h3 .tag{display:inline-block;font-size:12px;color:#fff;background:#56627a;border-radius:4px;padding:1px 6px;
margin-right:6px;white-space:normal}
.prow .sub{color:var(--mute);font-size:12px;margin:0 0 6px}
.systems{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,240px),1fr));gap:10px}
.sys{border:1px solid var(--line);border-radius:6px;padding:6px}
.sys.win{border:2px solid var(--win);box-shadow:0 0 0 3px rgba(224,168,0,.18)}
.sys .name{font-weight:600;display:flex;justify-content:space-between;font-variant-numeric:tabular-nums}
.sys.win .name::after{content:"winner";font-size:11px;background:var(--win);border-radius:8px;padding:1px 6px}
.thumbs{display:grid;grid-template-columns:repeat(auto-fit,minmax(120px,256px));gap:6px;margin-top:4px}
.thumbs a{display:flex;align-items:center;justify-content:center;aspect-ratio:1/1;background:#e9ecf1;
position:relative}
.thumbs img{width:100%;height:100%;object-fit:contain;display:block}
.thumbs small{position:absolute;bottom:0;right:0;background:rgba(29,35,48,.8);color:#fff;font-size:10px;padding:0 3px}
.ph{color:var(--mute);font-size:11px;padding:4px;overflow-wrap:anywhere}
.empty{color:var(--mute)}
ul.left{margin:4px 0;padding-left:18px;color:var(--mute)}ul.left li{overflow-wrap:anywhere}
footer{color:var(--mute);font-size:12px;padding:0 20px 20px}
"""

# The page's only script (its hash is in the CSP): shared thumbnails, and sorting the prompt rows.
_JS = page_script("""var sel=d.getElementById("sort"),box=d.getElementById("rows");
function sort(){
  var how=sel.value,rows=Array.prototype.slice.call(box.children);
  function key(r){var v=r.getAttribute(how.slice(1));return v===null||v===""?NaN:+v;}
  rows.sort(function(a,b){
    var x=key(a),y=key(b);
    if(isNaN(x)||isNaN(y))return isNaN(x)-isNaN(y);
    return how.charAt(0)==="+"?x-y:y-x;});
  rows.forEach(function(r){box.appendChild(r);});
}
if(sel&&box){
  sel.addEventListener("change",sort);
  var m=/^#sort=([+-]data-[a-z0-9]+)$/.exec(decodeURIComponent(location.hash));  // a link can pick the order
  if(m&&sel.querySelector('option[value="'+m[1]+'"]')){sel.value=m[1];sort();}
}
""")


def write_html(path: str, table: ScoreTable, result: CompareResult, *, meta: dict | None = None,
               title: str | None = None, workers: int | None = None, option: str = "--html") -> None:
    """Render the comparison page atomically (temp file, then rename); OutputError when it cannot be written."""
    thumbs = Thumbnails(workers)
    for row in table.prompts:
        for samples in row.samples:
            for x in samples:
                if x.path and x.score is not None:
                    thumbs.add(os.path.realpath(x.path))  # one file under two names is embedded once
    made = thumbs.collect()
    folder = os.path.dirname(os.path.abspath(path))
    write_page(path, option, lambda out: _Page(table, result, meta or dict(result.model), out, made, folder)
               .render(title or "pickrank compare"))


def _diff(a: float | None, b: float | None) -> str:
    """a - b for a data attribute; empty when either is missing (sorted last)."""
    return "" if a is None or b is None else f"{a - b:.6f}"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]: about `count` of them, 1, 2 or 5 times a power of ten apart."""
    if not hi > lo:
        lo, hi = lo - (abs(lo) * 0.05 or 1.0), hi + (abs(hi) * 0.05 or 1.0)
    raw = (hi - lo) / max(1, count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    return [round(i * step, 10) for i in range(first, last + 1)]


def _tick_label(v: float, ticks: list[float]) -> str:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    return f"{v:.{max(0, -math.floor(math.log10(step) + 1e-9))}f}"


class _Axis:
    """A horizontal score axis on round ticks, drawn under `rows` rows of a chart `width` wide."""

    LEFT, RIGHT, TOP, ROW = 130, 18, 10, 30

    def __init__(self, values: list[float], width: int) -> None:
        self.ticks = nice_ticks(min(values), max(values))
        self.lo, self.hi, self.width = self.ticks[0], self.ticks[-1], width

    def x(self, v: float) -> float:
        return self.LEFT + (self.width - self.LEFT - self.RIGHT) * (v - self.lo) / (self.hi - self.lo)

    def y(self, row: float) -> float:
        return self.TOP + self.ROW * (row + 0.5)

    def svg(self, rows: int, label: str, css: str) -> tuple[str, str]:
        """The opening <svg> with the grid and tick labels, and the closing tag."""
        height = self.TOP + self.ROW * rows + 38
        bottom = self.TOP + self.ROW * rows
        parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="{css}" width="{self.width}" height="{height}" '
                 f'viewBox="0 0 {self.width} {height}" role="img" aria-label="{esc(label)}">']
        for t in self.ticks:
            x = self.x(t)
            parts.append(f'<line class="tick" x1="{x:.1f}" y1="{self.TOP}" x2="{x:.1f}" y2="{bottom + 4}" '
                         f'stroke="#dde1e7"/><text x="{x:.1f}" y="{bottom + 17}" font-size="11" '
                         f'text-anchor="middle" fill="#6a7282">{_tick_label(t, self.ticks)}</text>')
        parts.append(f'<text x="{(self.LEFT + self.width - self.RIGHT) / 2:.1f}" y="{bottom + 33}" font-size="11" '
                     f'text-anchor="middle" fill="#6a7282">PickScore</text>')
        return "".join(parts), "</svg>"

    def name(self, row: int, text: str) -> str:
        short = text if len(text) <= 15 else text[:14] + "…"  # the label column is 120 px
        return (f'<text x="{self.LEFT - 10}" y="{self.y(row) + 4:.1f}" font-size="12" text-anchor="end" '
                f'fill="#1d2330">{esc(short)}<title>{esc(text)}</title></text>')


def mean_chart(result: CompareResult, width: int = 520) -> str:
    """SVG: each system's mean PickScore as a point, its interval as a whisker, on a score axis with round ticks
    (zoomed to the data: it does not start at 0)."""
    systems = [s for s in result.systems if s.mean is not None]
    if not systems:
        return '<p class="empty">No system has a score.</p>'
    axis = _Axis([v for s in systems for v in (s.low, s.high, s.mean) if v is not None], width)
    head, tail = axis.svg(len(systems), "mean PickScore per system, with its interval", "means")
    parts = [head]
    for i, s in enumerate(systems):
        y = axis.y(i)
        parts.append(axis.name(i, s.name))
        if s.low is not None and s.high is not None:
            x0, x1 = axis.x(s.low), axis.x(s.high)
            parts.append(f'<path class="whisker" d="M{x0:.1f} {y:.1f}H{x1:.1f}M{x0:.1f} {y - 6:.1f}v12M{x1:.1f} '
                         f'{y - 6:.1f}v12" stroke="#1d2330" stroke-width="2" fill="none"/>')
        colour = BASE_BAR if s.name == result.baseline else BAR
        parts.append(f'<circle class="point" cx="{axis.x(s.mean):.1f}" cy="{y:.1f}" r="7" fill="{colour}" '
                     f'stroke="#fff" stroke-width="1.5"><title>{esc(s.name)}: {number(s.mean)} '
                     f'{esc(interval(s.low, s.high))}</title></circle>')
    return "".join(parts) + tail


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    v = sorted(values)

    def at(q: float) -> float:
        pos = (len(v) - 1) * q
        i = int(pos)
        return v[i] + (v[min(i + 1, len(v) - 1)] - v[i]) * (pos - i)

    return at(0.25), at(0.5), at(0.75)


def distribution_chart(table: ScoreTable, result: CompareResult, width: int = 520) -> str:
    """SVG: each system's per-prompt scores as dots (spread a little up and down so that equal ones show), with a
    box from the first to the third quartile and a line at the median."""
    names = list(table.systems)
    per = [[v for v in (prompt_scores(row)[i] for row in table.prompts) if v is not None] for i in range(len(names))]
    if not any(per):
        return '<p class="empty">No system has a score.</p>'
    axis = _Axis([v for vs in per for v in vs], width)
    head, tail = axis.svg(len(names), "each system's per-prompt PickScores", "dist")
    parts = [head]
    for i, (name, values) in enumerate(zip(names, per)):
        y = axis.y(i)
        parts.append(axis.name(i, name))
        if values:
            q1, med, q3 = _quartiles(values)
            x1, xm, x3 = axis.x(q1), axis.x(med), axis.x(q3)
            parts.append(f'<rect class="iqr" x="{x1:.1f}" y="{y - 9:.1f}" width="{x3 - x1:.1f}" height="18" '
                         f'fill="#e8eefb" stroke="#9db4e8"/><line class="median" x1="{xm:.1f}" y1="{y - 9:.1f}" '
                         f'x2="{xm:.1f}" y2="{y + 9:.1f}" stroke="#1d2330"/>')
        colour = BASE_BAR if name == result.baseline else BAR
        for j, v in enumerate(values):
            dy = ((j * 7) % 11 - 5) * 1.2  # the same spread every time: the page is reproducible
            parts.append(f'<circle class="dot" cx="{axis.x(v):.1f}" cy="{y + dy:.1f}" r="3.5" fill="{colour}" '
                         f'fill-opacity=".7"><title>{esc(name)}: {number(v)}</title></circle>')
    return "".join(parts) + tail


def _heat(v: float) -> str:
    """Colour of a win rate: red below 0.5, white at 0.5, blue above."""
    t = max(-1.0, min(1.0, (v - 0.5) * 2))
    end = HEAT_HIGH if t > 0 else HEAT_LOW
    mix = [round(255 + (e - 255) * abs(t)) for e in end]
    return "#" + "".join(f"{c:02x}" for c in mix)


def _heat_legend(x: float, y: float, w: float) -> str:
    """The heat map's colour scale: 0 (the row's system loses every prompt), 0.5, 1 (it wins every one)."""
    stops = "".join(f'<stop offset="{o}" stop-color="{_heat(o)}"/>' for o in (0, 0.5, 1))
    labels = "".join(f'<text x="{x + w * o:.1f}" y="{y + 26}" font-size="11" text-anchor="{a}" fill="#6a7282">'
                     f'{t}</text>' for o, a, t in ((0, "start", "0: row loses all"), (0.5, "middle", "0.5"),
                                                   (1, "end", "1: row wins all")))
    return (f'<g class="legend"><defs><linearGradient id="heat-scale">{stops}</linearGradient></defs>'
            f'<rect x="{x}" y="{y}" width="{w}" height="12" fill="url(#heat-scale)" stroke="#c5ccd6"/>{labels}</g>')


def heat_map(result: CompareResult, cell: int = 64) -> str:
    """SVG: the win rate of each row's system over each column's, coloured around 0.5, with its legend."""
    names = [s.name for s in result.systems]
    matrix = win_matrix(result)
    left, top = 110, 30
    legend_w = max(cell * len(names), 200)
    size = (left + max(cell * len(names), legend_w) + 10, top + cell * len(names) + 50)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="heat" width="{size[0]}" height="{size[1]}" '
             f'viewBox="0 0 {size[0]} {size[1]}" role="img" aria-label="win rate of row over column">']
    for j, n in enumerate(names):
        parts.append(f'<text x="{left + cell * j + cell / 2}" y="{top - 8}" font-size="12" text-anchor="middle" '
                     f'fill="#1d2330">{esc(n if len(n) <= 9 else n[:8] + "…")}<title>{esc(n)}</title></text>')
    for i, a in enumerate(names):
        parts.append(f'<text x="{left - 6}" y="{top + cell * i + cell / 2 + 4}" font-size="12" text-anchor="end" '
                     f'fill="#1d2330">{esc(a if len(a) <= 14 else a[:13] + "…")}<title>{esc(a)}</title></text>')
        for j, v in enumerate(matrix[i]):
            fill = "#eef0f3" if v is None else _heat(v)
            label = "" if v is None else f"{v:.2f}"
            parts.append(f'<rect class="cell" x="{left + cell * j}" y="{top + cell * i}" width="{cell - 2}" '
                         f'height="{cell - 2}" fill="{fill}"><title>{esc(a)} over {esc(names[j])}: '
                         f'{label or "-"}</title></rect><text x="{left + cell * j + cell / 2 - 1}" '
                         f'y="{top + cell * i + cell / 2 + 4}" font-size="13" text-anchor="middle" '
                         f'fill="#1d2330">{label}</text>')
    parts.append(_heat_legend(left, top + cell * len(names) + 10, legend_w - 2))
    parts.append("</svg>")
    return "".join(parts)


class _Page(PageWriter):
    def __init__(self, table: ScoreTable, result: CompareResult, meta: dict, out: IO[str],
                 thumbs: dict[str, bytes | str], folder: str) -> None:
        super().__init__(out, thumbs, folder)
        self.t, self.r, self.meta = table, result, meta

    def render(self, title: str) -> None:
        r = self.r
        meta = header_meta(self.meta) + [
            ("prompts", r.prompts), ("systems", len(r.systems)), ("baseline", r.baseline),
            ("bootstrap", r.bootstrap), ("seed", r.seed), ("layout", r.layout)]
        self.w(page_head(title, "PickScore comparison", _CSS, _JS, meta, self.meta), "<main>\n")
        self.summary()
        self.w('<div class="charts"><figure id="means">', mean_chart(r),
               f'<figcaption>Mean PickScore per system (a point) with its {round(r.confidence * 100):g}% bootstrap '
               'interval (a whisker); the axis does not start at 0.</figcaption></figure>'
               '<figure id="dist">', distribution_chart(self.t, r),
               '<figcaption>Each prompt\'s PickScore per system (a dot; a prompt\'s score is the mean of its '
               'samples), the box from the first to the third quartile, the line at the median.</figcaption>'
               '</figure>')
        if len(r.systems) > 1 and r.pairs:
            self.w('<figure id="matrix">', heat_map(r), '<figcaption>Win rate of the row over the column '
                   '(a tie counts one half).</figcaption></figure>')
        self.w("</div>\n")
        self.curves()
        self.left_out()
        self.rows()
        self.w(f"</main>\n<footer>Made by pickrank {esc(__version__)}.</footer>\n<script>{_JS}</script>\n"
               "</body>\n</html>\n")

    def summary(self) -> None:
        r = self.r
        level = f"{round(r.confidence * 100):g}%"
        self.w('<h2>Summary</h2>\n<div class="scroll"><table class="sum" id="summary"><tr><th>system</th>'
               f'<th>mean</th><th>mean {level} CI</th><th>win rate vs {esc(r.baseline)}</th>'
               f'<th>win rate {level} CI</th><th>mean diff</th><th>p</th><th>prompts</th><th>images</th>'
               '<th>failed</th></tr>\n')
        for s in r.systems:
            p = r.pair(s.name, r.baseline)
            cells = ["baseline", "", "", ""] if s.name == r.baseline else ["-"] * 4 if p is None else [
                number(p.win_rate), marked(p.win_low, p.win_high, p.caveat), number(p.mean_diff), f"{p.p_value:.3g}"]
            cls = ' class="base"' if s.name == r.baseline else ""
            self.w(f'<tr{cls} data-system="{esc(s.name)}"><td>{esc(s.name)}</td><td>{number(s.mean)}</td>'
                   f'<td>{esc(marked(s.low, s.high, s.caveat))}</td>', "".join(f"<td>{esc(c)}</td>" for c in cells),
                   f"<td>{s.prompts}</td><td>{s.images}</td><td>{s.failed}</td></tr>\n")
        self.w("</table></div>\n")
        note = caveat_note(r)
        if note:
            self.w(f'<p class="caveat" id="caveat">{esc(note)}</p>\n')

    def curves(self) -> None:
        if not self.r.best_of_k:
            return
        self.w('<h2>Best of k</h2>\n<div class="scroll"><table class="sum" id="bestofk"><tr>'
               '<th>system vs one sample of</th>')
        width = max(len(c.ks) for c in self.r.best_of_k)
        self.w("".join(f"<th>k={k}</th>" for k in range(1, width + 1)), "</tr>\n")
        for c in self.r.best_of_k:
            self.w(f"<tr><td>{esc(c.system)} vs {esc(c.reference)}</td>",
                   "".join(f"<td>{number(v)}</td>" for v in c.win), "<td></td>" * (width - len(c.ks)), "</tr>\n")
        self.w("</table></div>\n")

    def left_out(self) -> None:
        items = [f"{e.id}: {e.reason}" for e in self.r.excluded]
        items += [f"{s.name} has no scored image for {len(s.missing)} prompt(s): {', '.join(s.missing[:20])}"
                  + (" ..." if len(s.missing) > 20 else "") for s in self.r.systems if s.missing]
        if items:
            self.w('<h2>Left out</h2>\n<ul class="left">', "".join(f"<li>{esc(i)}</li>" for i in items), "</ul>\n")

    def rows(self) -> None:
        t, r = self.t, self.r
        base = t.systems.index(r.baseline)
        others = [i for i in range(len(t.systems)) if i != base]
        self.w('<h2>Prompts</h2>\n<div class="tools"><label>Sort <select id="sort">'
               '<option value="+data-order">in order</option>'
               '<option value="+data-margin">most contested first</option>'
               '<option value="-data-margin">most lopsided first</option>')
        for i in others:
            name = esc(t.systems[i])
            self.w(f'<option value="-data-diff{i}">{name} ahead of {esc(r.baseline)} most</option>'
                   f'<option value="+data-diff{i}">{name} behind {esc(r.baseline)} most</option>')
        self.w(f'</select></label><span class="n">{len(t.prompts)} prompts</span></div>\n<div id="rows">\n')
        for n, row in enumerate(t.prompts):
            self.row(n, row, base, others)
        self.w("</div>\n")

    def row(self, n: int, row: PromptScores, base: int, others: Sequence[int]) -> None:
        scores = prompt_scores(row)
        top = winner(self.t.systems, scores)
        known = sorted((v for v in scores if v is not None), reverse=True)
        margin = f"{known[0] - known[1]:.6f}" if len(known) >= 2 else ""
        diffs = "".join(f' data-diff{i}="{_diff(scores[i], scores[base])}"' for i in others)
        self.w(f'<div class="prow" data-order="{n}" data-margin="{margin}"{diffs} data-id="{esc(row.id)}" '
               f'data-winner="{esc(top or "")}"><h3><span class="tag">{esc(row.id)}</span>'
               f'{esc(row.prompt) or "<span class=empty>(no prompt)</span>"}</h3>'
               f'<p class="sub">{"winner: " + esc(top) if top else "no single winner"}'
               f'{", margin " + margin[:5] if margin else ""}</p><div class="systems">')
        for name, samples, score in zip(self.t.systems, row.samples, scores):
            self.w(f'<div class="sys{" win" if name == top else ""}" data-system="{esc(name)}">'
                   f'<div class="name"><span>{esc(name)}</span><span>{number(score)}</span></div><div class="thumbs">')
            if not samples:
                self.w('<span class="ph">no image</span>')
            for x in samples:
                self.sample(x)
            self.w("</div></div>")
        self.w("</div></div>\n")

    def sample(self, x: Sample) -> None:
        path = x.path or ""
        if x.score is None:
            self.w(f'<span class="ph" title="{esc(path)}">failed: {esc(x.error or "no score")}</span>')
            return
        real = os.path.realpath(path)
        self.w(f'<a href="{esc(self.href(path))}" title="{esc(path)}  {number(x.score)}">')
        img = self.thumb_img(real, f'alt="{esc(os.path.basename(path))}" loading="lazy"')
        if img is not None:
            self.w(img)
        else:
            thumb = self.thumbs.get(real)
            self.w(f'<span class="ph">{esc(thumb if isinstance(thumb, str) else "no preview")}</span>')
        self.w(f"<small>{number(x.score, 2)}</small></a>")


__all__ = ["write_html", "nice_ticks", "mean_chart", "distribution_chart", "heat_map", "BAR", "HEAT_HIGH",
           "HEAT_LOW"]
