"""A self-contained HTML gallery of rankings: one file, inline CSS and JS, thumbnails embedded as base64 JPEG.

`HtmlReport` is a sink like the writers: `write(records)` for each finished ranking, `close()` at the end (also
after Ctrl-C), which renders the page to a temp file and renames it into place. Thumbnails are made in worker
processes as records arrive, so the page costs little on top of scoring. `load_results` reads saved `-f jsonl`
(or `-f json`) results back for `pickrank report`.

Everything that comes from prompts or file names is HTML-escaped; on top of that a Content-Security-Policy lets
only the page's own script run, so an injected `<script>` could not execute even if escaping were missed.
Nothing is fetched from the network: the large view references the original image by a relative path.
"""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Iterable, Iterator

from pickrank import __version__
from pickrank.errors import UsageError
from pickrank.inputs.textfile import loads_json
from pickrank.records import Record
from pickrank.report.page import (
    HEADER_CSS,
    INLINE_BELOW,
    PageWriter,
    Thumbnails,
    check_html,
    esc,
    header_meta,
    number,
    page_head,
    page_script,
    write_page,
)

_KINDS = ("score", "best-of-n", "batch")

_CSS = """
:root{--bg:#f4f5f7;--card:#fff;--ink:#1d2330;--mute:#6a7282;--line:#dde1e7;--acc:#2f6fde;--win:#e0a800;--bad:#c0392b}
""" + HEADER_CSS + """.tools{position:sticky;top:0;z-index:5;display:flex;flex-wrap:wrap;gap:6px 10px;align-items:center;
padding:8px 20px;background:rgba(244,245,247,.95);border-bottom:1px solid var(--line)}
.tools input{flex:1 1 160px;min-width:0;max-width:420px;padding:6px 9px;border:1px solid #c5ccd6;border-radius:6px;
font:inherit}
.tools select{padding:5px;border:1px solid #c5ccd6;border-radius:6px;font:inherit}
.tools .n{color:var(--mute);font-size:13px}
main{padding:6px 20px 40px}
section.set{margin:18px 0 28px}
section.set>h2{font-size:16px;margin:0 0 4px;white-space:pre-wrap;overflow-wrap:anywhere}
section.set>h2 .tag{display:inline-block;font-size:12px;font-weight:600;color:#fff;background:#56627a;
border-radius:4px;padding:1px 6px;margin-right:6px;vertical-align:2px;white-space:normal}
section.set>h2 .tag.src{background:#7a6a56;font-weight:400}
.sub{color:var(--mute);font-size:12px;margin:0 0 10px}
svg.strip{display:block;max-width:100%;height:auto;margin:0 0 10px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:12px}
.card{position:relative;background:var(--card);border:1px solid var(--line);border-radius:8px;overflow:hidden;
content-visibility:auto;contain-intrinsic-size:auto 280px}
.card.win{border:2px solid var(--win);box-shadow:0 0 0 3px rgba(224,168,0,.18)}
.card .badge{position:absolute;top:6px;left:6px;z-index:1;background:rgba(29,35,48,.82);color:#fff;font-weight:700;
font-size:12px;padding:2px 7px;border-radius:10px}
.card.win .badge{background:var(--win);color:#1d2330}
a.th{display:flex;align-items:center;justify-content:center;height:190px;background:#e9ecf1;cursor:zoom-in}
a.th img{max-width:100%;max-height:190px;display:block}
.ph{color:var(--mute);font-size:12px;text-align:center;padding:10px}
.info{padding:7px 9px 9px}
.row{display:flex;justify-content:space-between;gap:6px;font-variant-numeric:tabular-nums}
.row b{font-size:15px}.row span{color:var(--mute)}
.bar{height:6px;background:#e6e9ee;border-radius:3px;margin:5px 0 6px;overflow:hidden}
.bar i{display:block;height:100%;background:var(--acc)}
.card.win .bar i{background:var(--win)}
.name{font-size:12px;color:#3b4352;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.copied{font-size:11px;color:var(--mute);white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
details.failed{margin-top:12px;background:#fff5f4;border:1px solid #f0c9c4;border-radius:8px;padding:6px 12px}
details.failed summary{color:var(--bad);font-weight:600;cursor:pointer}
details.failed ul{margin:6px 0;padding-left:18px}details.failed li{overflow-wrap:anywhere}
details.failed .why{color:var(--mute)}
.empty{color:var(--mute)}
.hide{display:none!important}
#lb{position:fixed;inset:0;z-index:20;background:rgba(10,12,18,.9);display:flex;flex-direction:column;
align-items:center;justify-content:center;padding:24px;cursor:zoom-out}
#lb[hidden]{display:none}
#lb img{max-width:100%;max-height:calc(100% - 40px);object-fit:contain;background:#fff}
#lb .cap{color:#e6e9ee;margin-top:10px;font-size:13px;text-align:center;overflow-wrap:anywhere}
footer{color:var(--mute);font-size:12px;padding:0 20px 20px}
"""

# The page's only script. Its hash goes into the Content-Security-Policy, so no other script can run.
_JS = page_script("""var q=d.getElementById("q"),sortSel=d.getElementById("sort"),count=d.getElementById("n");
var sets=Array.prototype.slice.call(d.querySelectorAll("section.set"));
function filter(){
  var t=q.value.trim().toLowerCase(),shown=0;
  sets.forEach(function(s){
    var inPrompt=!t||(s.getAttribute("data-prompt")||"").toLowerCase().indexOf(t)>=0,any=false;
    s.querySelectorAll(".card").forEach(function(c){
      var ok=inPrompt||(c.getAttribute("data-path")||"").toLowerCase().indexOf(t)>=0;
      c.classList.toggle("hide",!ok);if(ok){any=true;shown++;}});
    s.classList.toggle("hide",!(any||inPrompt));});
  count.textContent=shown+" shown";
}
function sort(){
  var how=sortSel.value;
  sets.forEach(function(s){
    var g=s.querySelector(".grid");if(!g)return;
    var cards=Array.prototype.slice.call(g.children);
    cards.sort(function(a,b){
      if(how==="name"){var x=a.getAttribute("data-name"),y=b.getAttribute("data-name");return x<y?-1:x>y?1:0;}
      var r=(+a.getAttribute("data-rank"))-(+b.getAttribute("data-rank"));return how==="worst"?-r:r;});
    cards.forEach(function(c){g.appendChild(c);});});
}
var timer=0;
q.addEventListener("input",function(){clearTimeout(timer);timer=setTimeout(filter,120);});
sortSel.addEventListener("change",sort);
var lb=d.getElementById("lb"),lbImg=lb.querySelector("img"),lbCap=lb.querySelector(".cap");
d.addEventListener("click",function(e){
  var a=e.target.closest&&e.target.closest("a.th");
  if(!a||e.ctrlKey||e.metaKey||e.shiftKey||e.button!==0)return;
  e.preventDefault();
  var thumb=a.querySelector("img"),card=a.closest(".card");
  lbImg.onerror=function(){lbImg.onerror=null;if(thumb&&thumb.src)lbImg.src=thumb.src;};
  lbImg.src=a.getAttribute("href")||(thumb?thumb.src:"");
  lbCap.textContent=card?card.getAttribute("data-caption"):"";
  lb.hidden=false;
});
function shut(){lb.hidden=true;lbImg.removeAttribute("src");}
lb.addEventListener("click",shut);
d.addEventListener("keydown",function(e){if(e.key==="Escape"&&!lb.hidden)shut();});
""")


# -- the report ------------------------------------------------------------------------------------------

def _split_rankings(records: Iterable[Record]) -> Iterator[list[Record]]:
    """Consecutive records of one ranking: same (prompt, id, group), scored ones before errors, ranks rising."""
    section: list[Record] = []
    for r in records:
        if section:
            last = section[-1]
            same = (r.prompt, r.id, r.group) == (last.prompt, last.id, last.group)
            restart = r.error is None and (last.error is not None or (r.rank or 0) < (last.rank or 0))
            if not same or restart:
                yield section
                section = []
        section.append(r)
    if section:
        yield section


class HtmlReport:
    """The gallery page for one run (a `Sink`): `write(records)` per ranking, `set_meta(...)` once, `close()` at
    the end. A failed run's page is rendered too (`discard`), with what it received."""

    wants_meta = True

    def __init__(self, path: str, kind: str = "score", *, workers: int | None = None,
                 inline_below: int = INLINE_BELOW, title: str | None = None, option: str = "--html") -> None:
        check_html(path, option)
        self.path = path
        self.option = option  # how error messages name the page: --html, or report's -o
        self.kind = kind if kind in _KINDS else "score"
        self.title = title
        self.meta: dict[str, object] = {}
        self.sections: list[list[Record]] = []
        self.thumbs = Thumbnails(workers, inline_below)
        self.closed = False

    def set_meta(self, meta: dict) -> None:
        """The run's provenance (`Provenance.as_dict()`), or the model fields saved results carry."""
        self.meta.update(meta)  # None values too: a local folder's revision is None in the provenance

    def write(self, records: Iterable[Record]) -> None:
        """Add the rankings among `records` (their thumbnails start now)."""
        for section in _split_rankings(records):
            self.sections.append(section)
            for r in section:
                if r.error is None and r.path:
                    self.thumbs.add(r.path)

    def describe(self) -> str:
        return f"{self.option} {self.path}"

    def discard(self) -> None:
        """The run failed: the page still shows what was scored."""
        self.close()

    def abandon(self) -> None:
        """Write no page at all (the run found that it would overwrite one of its inputs)."""
        self.closed = True
        self.thumbs.shutdown()

    def close(self) -> None:
        """Render the page with whatever was received, atomically (temp file, then rename)."""
        if self.closed:
            return
        self.closed = True
        thumbs = self.thumbs.collect()
        folder = os.path.dirname(os.path.abspath(self.path))
        write_page(self.path, self.option, lambda out: _Renderer(self, out, thumbs, folder).page())


class _Renderer(PageWriter):
    def __init__(self, report: HtmlReport, out: IO[str], thumbs: dict[str, bytes | str], folder: str) -> None:
        super().__init__(out, thumbs, folder)
        self.r = report

    def page(self) -> None:
        sections = self.r.sections
        scored = [r for s in sections for r in s if r.error is None]
        failed = [r for s in sections for r in s if r.error is not None]
        title = self.r.title or f"pickrank {self.r.kind}"
        meta = header_meta(self.r.meta) + [
            ("rankings", len(sections)), ("images ranked", len(scored)),
            ("distinct images", len({r.path for r in scored})), ("failed", len(failed))]
        self.w(page_head(title, "PickScore ranking", _CSS, _JS, meta, self.r.meta),
               '<div class="tools"><input id="q" type="search" placeholder="Filter by prompt '
               'or file name" aria-label="Filter"><label>Sort <select id="sort"><option value="rank">score, best '
               'first</option><option value="worst">score, worst first</option><option value="name">file name'
               f'</option></select></label><span class="n" id="n">{len(scored)} shown</span></div>\n<main>\n')
        if not sections:
            self.w('<p class="empty">No results.</p>\n')
        for i, section in enumerate(sections):
            self.section(i, section)
        self.w('</main>\n<div id="lb" hidden><img alt="large view"><div class="cap"></div></div>\n',
               f"<footer>Made by pickrank {esc(__version__)}. Click a picture for the full image.</footer>\n",
               f"<script>{_JS}</script>\n</body>\n</html>\n")

    def section(self, i: int, records: list[Record]) -> None:
        first = records[0]
        prompt = first.prompt or ""
        tag = ""
        if first.group is not None:
            tag = f'<span class="tag" title="group">{esc(first.group)}</span>'
        elif first.id is not None:
            tag = f'<span class="tag" title="id">{esc(first.id)}</span>'
        if first.prompt_source is not None:
            tag += f'<span class="tag src" title="where the prompt came from">{esc(first.prompt_source)}</span>'
        heading = esc(prompt) if prompt else '<span class="empty">(no prompt)</span>'
        scored = [r for r in records if r.error is None]
        failed = [r for r in records if r.error is not None]
        self.w(f'<section class="set" id="s{i}" data-prompt="{esc(prompt)}">\n<h2>{tag}{heading}</h2>\n')
        sub = [f"{len(scored)} image{'s' if len(scored) != 1 else ''} ranked"]
        if failed:
            sub.append(f"{len(failed)} failed")
        if any(r.truncated for r in records):
            sub.append("prompt truncated to the model's 77 tokens")
        self.w(f'<p class="sub">{esc(", ".join(sub))}</p>\n')
        if len(scored) > 1:
            self.w(score_strip(scored), "\n")
        if scored:
            self.w('<div class="grid">\n')
            for r in scored:
                self.card(r)
            self.w("</div>\n")
        if failed:
            self.w(f'<details class="failed" open><summary>{len(failed)} failed</summary><ul>\n')
            for r in failed:
                self.w(f'<li><span class="path">{esc(r.path or "(no path)")}</span> '
                       f'<span class="why">— {esc(r.error)}</span></li>\n')
            self.w("</ul></details>\n")
        self.w("</section>\n")

    def card(self, r: Record) -> None:
        path = r.path or ""
        name = os.path.basename(path) or path
        folder = os.path.basename(os.path.dirname(path))
        label = f"{folder}/{name}" if folder else name  # a best-of-n group's cand0.png says which group
        win = r.rank == 1
        prob = max(0.0, min(1.0, r.prob or 0.0))
        caption = f"#{r.rank}  {name}  score {number(r.score)}  prob {number(r.prob)}"
        self.w(f'<div class="card{" win" if win else ""}" data-rank="{esc(r.rank if r.rank is not None else "")}" '
               f'data-score="{esc(r.score if r.score is not None else "")}" data-name="{esc(name.lower())}" '
               f'data-path="{esc(path)}" data-caption="{esc(caption)}">'
               f'<span class="badge">#{esc(r.rank)}{" best" if win else ""}</span>'
               f'<a class="th" href="{esc(self.href(path))}" title="{esc(path)}">')
        img = self.thumb_img(path, f'alt="{esc(name)}" loading="lazy" decoding="async"')
        if img is not None:
            self.w(img)
        else:
            thumb = self.thumbs.get(path)
            why = thumb if isinstance(thumb, str) else "no preview"
            self.w(f'<span class="ph" title="{esc(why)}">no preview<br>{esc(why)}</span>')
        self.w('</a><div class="info">'
               f'<div class="row"><b>{esc(number(r.score))}</b><span>prob {esc(number(r.prob))}</span></div>'
               f'<div class="bar" title="prob {esc(number(r.prob))}"><i style="width:{prob * 100:.1f}%"></i></div>'
               f'<div class="name" title="{esc(path)}">{esc(label)}</div>')
        if r.copied_to:
            self.w(f'<div class="copied" title="{esc(r.copied_to)}">copied to {esc(r.copied_to)}</div>')
        self.w("</div></div>\n")


def score_strip(records: list[Record], width: int = 400) -> str:
    """SVG: where a ranking's scores lie, one dot per image (the winner's in gold), between its lowest and highest
    score."""
    scores = [r.score for r in records if r.score is not None]
    lo, hi = min(scores), max(scores)
    pad = (hi - lo) * 0.05 or 1.0
    x0, x1 = lo - pad, hi + pad

    def x(v: float) -> float:
        return 50 + (width - 100) * (v - x0) / (x1 - x0)

    dots = "".join(f'<circle class="sdot{" win" if r.rank == 1 else ""}" cx="{x(r.score):.1f}" cy="14" r="5" '
                   f'fill="{"#e0a800" if r.rank == 1 else "#2f6fde"}" fill-opacity=".75"><title>#{esc(r.rank)} '
                   f'{esc(os.path.basename(r.path or ""))}: {number(r.score)}</title></circle>'
                   for r in records if r.score is not None)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="strip" width="{width}" height="30" viewBox="0 0 {width} '
            f'30" role="img" aria-label="the scores of this ranking"><line x1="{x(lo):.1f}" y1="14" x2="{x(hi):.1f}" '
            f'y2="14" stroke="#c5ccd6"/><text x="{x(lo) - 8:.1f}" y="18" font-size="11" text-anchor="end" '
            f'fill="#6a7282">{number(lo, 2)}</text><text x="{x(hi) + 8:.1f}" y="18" font-size="11" fill="#6a7282">'
            f'{number(hi, 2)}</text>{dots}</svg>')


# -- saved results ---------------------------------------------------------------------------------------

_RECORD_FIELDS = ("prompt", "prompt_source", "path", "score", "prob", "rank", "id", "group", "error", "truncated",
                  "copied_to")
_META_FIELDS = ("model", "revision", "device", "dtype", "pickrank")


def _to_record(d: dict, where: str) -> Record:
    def num(key: str, kind: type) -> object:
        v = d.get(key)
        if v is None or v == "":
            return None
        try:
            return kind(v)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: '{key}' is not a number: {v!r}") from None

    def text(key: str) -> str | None:
        v = d.get(key)
        return None if v is None or v == "" else str(v)

    truncated = d.get("truncated")
    return Record(prompt=text("prompt"), path=text("path"), score=num("score", float), prob=num("prob", float),
                  rank=num("rank", int), id=text("id"), group=text("group"), error=text("error"),
                  truncated=truncated in (True, "true", "True", "1", 1), copied_to=text("copied_to"),
                  prompt_source=text("prompt_source"))


def _with_meta(text: str) -> tuple[dict, list] | None:
    """(meta, records) of results saved with `-f json --with-meta`; None for anything else (JSON Lines, an array)."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        data = loads_json(text)
    except ValueError:  # JSON Lines: one object per line (or nested too deep: refused below)
        return None
    if isinstance(data, dict) and isinstance(data.get("records"), list) and isinstance(data.get("meta"), dict):
        return data["meta"], data["records"]
    return None


def load_results(path: str) -> tuple[list[Record], dict, str]:
    """Records saved with `-f jsonl` (or `-f json`, with or without --with-meta), the meta they carry (the
    provenance, or the model fields of their records), and the command kind guessed.

    Raises UsageError (exit 2) for a missing, unreadable or invalid file.
    """
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8-sig") as f:
                text = f.read()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a folder, not a results file") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text; give results written with -f jsonl") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror or e}") from None
    rows: list[tuple[str, object]] = []
    wrapped = _with_meta(text)
    meta: dict = dict(wrapped[0]) if wrapped is not None else {}
    if wrapped is not None or text.lstrip().startswith("["):
        try:
            data = wrapped[1] if wrapped is not None else loads_json(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        except ValueError as e:  # nested too deep to read safely
            raise UsageError(f"{path}: not valid JSON ({e})") from None
        rows = [(f"{path} item {i + 1}", d) for i, d in enumerate(data)]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path} line {n}", loads_json(line)))
            except ValueError:
                raise UsageError(f"{path} line {n}: not JSON; give results written with -f jsonl") from None
    records: list[Record] = []
    keys: set[str] = set()
    for where, d in rows:
        if not isinstance(d, dict) or not ({"path", "prompt"} & d.keys()):
            raise UsageError(f"{where}: not a pickrank result (an object with 'prompt' and 'path')")
        keys.update(d.keys())
        records.append(_to_record(d, where))
        for k in _META_FIELDS:
            if d.get(k) is not None and k not in meta:
                meta[k] = d[k]
    if not records:
        raise UsageError(f"{path}: no results in it")
    kind = "best-of-n" if "group" in keys else "batch" if "id" in keys else "score"
    return records, meta, kind


def render_results(results: str, output: str, workers: int | None = None) -> tuple[int, int]:
    """`pickrank report`: the HTML page for saved results. Returns (rankings, images whose file is missing)."""
    records, meta, kind = load_results(results)
    report = HtmlReport(output, kind=kind, workers=workers, option="-o")
    report.set_meta(meta)
    report.write(records)
    missing = sum(1 for p in {r.path for r in records if r.error is None and r.path} if not os.path.exists(p))
    report.close()
    return len(report.sections), missing


__all__ = ["HtmlReport", "load_results", "render_results", "score_strip"]
