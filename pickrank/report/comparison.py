"""The `pickrank compare --html` page: one self-contained file, built as the gallery is (pickrank.report.page).

The summary table; a bar chart of the means with interval whiskers and a win-rate heat map, both inline SVG
drawn here; then one row per prompt with each system's images side by side, the winner marked, sortable by the
score difference. No network, everything from prompts, names and paths escaped with `esc`, a CSP that lets
only the page's own script run, thumbnails embedded once each as base64 JPEG.
"""

from __future__ import annotations

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

BAR = "#2f6fde"  # the bars' colour (the screenshot test looks for it)
BASE_BAR = "#8e99ad"
HEAT_HIGH, HEAT_LOW = (33, 102, 172), (178, 24, 43)  # win rate 1 and 0 (not the bars' colour)

_CSS = """
:root{--bg:#f4f5f7;--card:#fff;--ink:#1d2330;--mute:#6a7282;--line:#dde1e7;--acc:#2f6fde;--win:#e0a800}
""" + HEADER_CSS + """main{padding:6px 20px 40px}
h2{font-size:16px;margin:20px 0 8px}
table.sum{border-collapse:collapse;background:var(--card);font-variant-numeric:tabular-nums}
table.sum th,table.sum td{border:1px solid var(--line);padding:5px 10px;text-align:right}
table.sum th:first-child,table.sum td:first-child{text-align:left}
table.sum tr.base td{color:var(--mute)}
.charts{display:flex;flex-wrap:wrap;gap:20px;align-items:flex-start;margin-top:16px}
.charts figure{margin:0;background:var(--card);border:1px solid var(--line);border-radius:8px;padding:8px}
.charts figcaption{font-size:12px;color:var(--mute);margin-top:4px;max-width:520px}
.tools{position:sticky;top:0;z-index:5;display:flex;gap:10px;align-items:center;padding:8px 0;
background:rgba(244,245,247,.95);border-bottom:1px solid var(--line)}
.tools select{padding:5px;border:1px solid #c5ccd6;border-radius:6px;font:inherit}
.prow{background:var(--card);border:1px solid var(--line);border-radius:8px;margin:12px 0;padding:8px 10px;
content-visibility:auto;contain-intrinsic-size:auto 300px}
.prow h3{font-size:14px;margin:0 0 6px;white-space:pre-wrap;overflow-wrap:anywhere}
.prow h3 .tag{display:inline-block;font-size:12px;color:#fff;background:#56627a;border-radius:4px;padding:1px 6px;
margin-right:6px;white-space:normal}
.prow .sub{color:var(--mute);font-size:12px;margin:0 0 6px}
.systems{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:10px}
.sys{border:1px solid var(--line);border-radius:6px;padding:6px}
.sys.win{border:2px solid var(--win);box-shadow:0 0 0 3px rgba(224,168,0,.18)}
.sys .name{font-weight:600;display:flex;justify-content:space-between;font-variant-numeric:tabular-nums}
.sys.win .name::after{content:"winner";font-size:11px;background:var(--win);border-radius:8px;padding:1px 6px}
.thumbs{display:flex;flex-wrap:wrap;gap:4px;margin-top:4px}
.thumbs a{display:block;width:100px;height:100px;background:#e9ecf1;position:relative}
.thumbs img{max-width:100px;max-height:100px;display:block;margin:auto}
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


def bar_chart(result: CompareResult, width: int = 520, height: int = 260) -> str:
    """SVG: one bar per system's mean, whiskers for its interval; the axis is zoomed to the data (not from 0)."""
    systems = [s for s in result.systems if s.mean is not None]
    if not systems:
        return '<p class="empty">No system has a score.</p>'
    lo = min(s.low if s.low is not None else s.mean for s in systems)
    hi = max(s.high if s.high is not None else s.mean for s in systems)
    pad = (hi - lo) * 0.15 or abs(hi) * 0.01 or 1.0
    lo, hi = lo - pad, hi + pad
    left, top, bottom = 56, 14, 40
    plot_h, plot_w = height - top - bottom, width - left - 10
    y = (lambda v: top + plot_h * (hi - v) / (hi - lo))
    step = plot_w / len(systems)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="bars" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="mean PickScore per system">',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#6a7282"/>']
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        parts.append(f'<line x1="{left - 4}" y1="{y(v):.1f}" x2="{width - 10}" y2="{y(v):.1f}" stroke="#dde1e7"/>'
                     f'<text x="{left - 6}" y="{y(v) + 4:.1f}" font-size="11" text-anchor="end" fill="#6a7282">'
                     f'{v:.2f}</text>')
    for i, s in enumerate(systems):
        x0, bw = left + i * step + step * 0.2, step * 0.6
        colour = BASE_BAR if s.name == result.baseline else BAR
        parts.append(f'<rect class="bar" x="{x0:.1f}" y="{y(s.mean):.1f}" width="{bw:.1f}" '
                     f'height="{top + plot_h - y(s.mean):.1f}" fill="{colour}"><title>{esc(s.name)}: '
                     f'{number(s.mean)} {esc(interval(s.low, s.high))}</title></rect>')
        if s.low is not None and s.high is not None:
            cx = x0 + bw / 2
            parts.append(f'<path class="whisker" d="M{cx:.1f} {y(s.low):.1f}V{y(s.high):.1f}M{cx - 8:.1f} '
                         f'{y(s.low):.1f}h16M{cx - 8:.1f} {y(s.high):.1f}h16" stroke="#1d2330" stroke-width="2" '
                         'fill="none"/>')
        parts.append(f'<text x="{x0 + bw / 2:.1f}" y="{top + plot_h + 16}" font-size="12" text-anchor="middle" '
                     f'fill="#1d2330">{esc(s.name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _heat(v: float) -> str:
    """Colour of a win rate: red below 0.5, white at 0.5, blue above."""
    t = max(-1.0, min(1.0, (v - 0.5) * 2))
    end = HEAT_HIGH if t > 0 else HEAT_LOW
    mix = [round(255 + (e - 255) * abs(t)) for e in end]
    return "#" + "".join(f"{c:02x}" for c in mix)


def heat_map(result: CompareResult, cell: int = 64) -> str:
    """SVG: the win rate of each row's system over each column's, coloured around 0.5."""
    names = [s.name for s in result.systems]
    matrix = win_matrix(result)
    left, top = 110, 30
    size = (left + cell * len(names) + 10, top + cell * len(names) + 10)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="heat" width="{size[0]}" height="{size[1]}" '
             f'viewBox="0 0 {size[0]} {size[1]}" role="img" aria-label="win rate of row over column">']
    for j, n in enumerate(names):
        parts.append(f'<text x="{left + cell * j + cell / 2}" y="{top - 8}" font-size="12" text-anchor="middle" '
                     f'fill="#1d2330">{esc(n[:12])}</text>')
    for i, a in enumerate(names):
        parts.append(f'<text x="{left - 6}" y="{top + cell * i + cell / 2 + 4}" font-size="12" text-anchor="end" '
                     f'fill="#1d2330">{esc(a[:16])}</text>')
        for j, v in enumerate(matrix[i]):
            fill = "#eef0f3" if v is None else _heat(v)
            label = "" if v is None else f"{v:.2f}"
            parts.append(f'<rect class="cell" x="{left + cell * j}" y="{top + cell * i}" width="{cell - 2}" '
                         f'height="{cell - 2}" fill="{fill}"><title>{esc(a)} over {esc(names[j])}: '
                         f'{label or "-"}</title></rect><text x="{left + cell * j + cell / 2 - 1}" '
                         f'y="{top + cell * i + cell / 2 + 4}" font-size="13" text-anchor="middle" '
                         f'fill="#1d2330">{label}</text>')
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
        self.w('<div class="charts"><figure id="means">', bar_chart(r),
               f'<figcaption>Mean PickScore per system with its {round(r.confidence * 100):g}% bootstrap interval '
               '(the axis does not start at 0).</figcaption></figure>')
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
        self.w('<h2>Summary</h2>\n<table class="sum" id="summary"><tr><th>system</th><th>mean</th><th>CI</th>'
               f'<th>win vs {esc(r.baseline)}</th><th>CI</th><th>mean diff</th><th>p</th><th>prompts</th>'
               '<th>images</th><th>failed</th></tr>\n')
        for s in r.systems:
            p = r.pair(s.name, r.baseline)
            cells = ["baseline", "", "", ""] if s.name == r.baseline else ["-"] * 4 if p is None else [
                number(p.win_rate), marked(p.win_low, p.win_high, p.caveat), number(p.mean_diff), f"{p.p_value:.3g}"]
            cls = ' class="base"' if s.name == r.baseline else ""
            self.w(f'<tr{cls} data-system="{esc(s.name)}"><td>{esc(s.name)}</td><td>{number(s.mean)}</td>'
                   f'<td>{esc(marked(s.low, s.high, s.caveat))}</td>', "".join(f"<td>{esc(c)}</td>" for c in cells),
                   f"<td>{s.prompts}</td><td>{s.images}</td><td>{s.failed}</td></tr>\n")
        self.w("</table>\n")
        note = caveat_note(r)
        if note:
            self.w(f'<p class="caveat" id="caveat">{esc(note)}</p>\n')

    def curves(self) -> None:
        if not self.r.best_of_k:
            return
        self.w('<h2>Best of k</h2>\n<table class="sum" id="bestofk"><tr><th>system vs one sample of</th>')
        width = max(len(c.ks) for c in self.r.best_of_k)
        self.w("".join(f"<th>k={k}</th>" for k in range(1, width + 1)), "</tr>\n")
        for c in self.r.best_of_k:
            self.w(f"<tr><td>{esc(c.system)} vs {esc(c.reference)}</td>",
                   "".join(f"<td>{number(v)}</td>" for v in c.win), "<td></td>" * (width - len(c.ks)), "</tr>\n")
        self.w("</table>\n")

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


__all__ = ["write_html", "bar_chart", "heat_map", "BAR", "HEAT_HIGH", "HEAT_LOW"]
