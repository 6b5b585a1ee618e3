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

import base64
import hashlib
import html
import json
import os
import sys
import urllib.parse
from concurrent.futures import Future, ProcessPoolExecutor
from datetime import datetime
from typing import IO, Iterable, Iterator

from pickrank import __version__
from pickrank.errors import OutputError, UsageError
from pickrank.inputs.reader import close_pool, worker_pool
from pickrank.output.targets import Output, check_output
from pickrank.records import Record
from pickrank.signals import signals_deferred

THUMB_SIZE = 256
# Fewer images than this are thumbnailed in the main process at close (a pool's start-up costs more).
INLINE_BELOW = 16
_KINDS = ("score", "best-of-n", "batch")

_CSS = """
:root{--bg:#f4f5f7;--card:#fff;--ink:#1d2330;--mute:#6a7282;--line:#dde1e7;--acc:#2f6fde;--win:#e0a800;--bad:#c0392b}
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;background:var(--bg);
color:var(--ink)}
header{background:#1d2330;color:#fff;padding:14px 20px}
header h1{margin:0 0 6px;font-size:20px}
header h1 small{font-weight:normal;color:#aab3c5;font-size:13px;margin-left:8px}
dl.meta{display:flex;flex-wrap:wrap;gap:4px 18px;margin:0;font-size:13px;color:#cfd6e4}
dl.meta div{display:flex;gap:5px}dl.meta dt{color:#8e99ad}dl.meta dd{margin:0;overflow-wrap:anywhere}
.tools{position:sticky;top:0;z-index:5;display:flex;gap:10px;align-items:center;padding:8px 20px;
background:rgba(244,245,247,.95);border-bottom:1px solid var(--line)}
.tools input{flex:1;max-width:420px;padding:6px 9px;border:1px solid #c5ccd6;border-radius:6px;font:inherit}
.tools select{padding:5px;border:1px solid #c5ccd6;border-radius:6px;font:inherit}
.tools .n{color:var(--mute);font-size:13px}
main{padding:6px 20px 40px}
section.set{margin:18px 0 28px}
section.set>h2{font-size:16px;margin:0 0 4px;white-space:pre-wrap;overflow-wrap:anywhere}
section.set>h2 .tag{display:inline-block;font-size:12px;font-weight:600;color:#fff;background:#56627a;
border-radius:4px;padding:1px 6px;margin-right:6px;vertical-align:2px;white-space:normal}
section.set>h2 .tag.src{background:#7a6a56;font-weight:400}
.sub{color:var(--mute);font-size:12px;margin:0 0 10px}
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
_JS = """
(function(){
"use strict";
var d=document;
d.querySelectorAll("img[data-t]").forEach(function(im){
  var src=d.getElementById(im.getAttribute("data-t"));if(src)im.src=src.src;});
var q=d.getElementById("q"),sortSel=d.getElementById("sort"),count=d.getElementById("n");
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
d.documentElement.setAttribute("data-ready","1");
})();
"""

def content_security_policy(script: str) -> str:
    """The pages' policy: nothing fetched, inline styles, and only `script` (by its hash) may run."""
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    return ("default-src 'none'; img-src * data: file: blob:; style-src 'unsafe-inline'; "
            f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'")


_CSP = content_security_policy(_JS)


def _clean(text: object) -> str:
    """Text safe to write as UTF-8: file names that are not valid UTF-8 get replacement characters."""
    s = str(text)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def esc(text: object) -> str:
    """HTML-escape anything (quotes too, so the result is safe in attributes)."""
    return html.escape(_clean(text), quote=True)


# The provenance block both pages show (html.py's gallery and compare_html.py's comparison).
PROVENANCE_CSS = """
details.prov{margin:10px 20px 0;background:#fff;border:1px solid var(--line,#dde1e7);border-radius:8px;padding:6px 12px;
font-size:12px}details.prov summary{cursor:pointer;font-weight:600}
details.prov table{border-collapse:collapse;margin:6px 0}details.prov th{text-align:left;padding:2px 12px 2px 0;
vertical-align:top;color:#6a7282;font-weight:normal}details.prov td{overflow-wrap:anywhere;font-family:monospace}
"""


def header_meta(meta: dict) -> list[tuple[str, object]]:
    """The header's model items, from the provenance (or the fields saved results carry), and the date."""
    date = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()
    version = meta.get("pickrank") or (meta.get("versions") or {}).get("pickrank") or __version__
    return [("model", meta.get("model")), ("revision", meta.get("revision")), ("dtype", meta.get("dtype")),
            ("device", meta.get("device")), ("scale", meta.get("scale")), ("pickrank", version), ("date", date)]


def _flat(value: object) -> str:
    """A provenance value as one line of text."""
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_flat(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_flat(v) for v in value)
    return "-" if value is None else str(value)


def provenance_block(meta: dict) -> str:
    """The run's provenance, when the page has one: a visible table, and the same as JSON in the block's data-json
    attribute for machines (escaped as every attribute: no extra script, so the page still runs only its own)."""
    if "weights" not in meta:  # saved results without --with-meta: only the fields their records carry
        return ""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(_flat(v))}</td></tr>" for k, v in meta.items())
    return (f'<details class="prov" id="provenance" data-json="{esc(json.dumps(meta, ensure_ascii=False))}">'
            f"<summary>Provenance</summary><table>{rows}</table></details>\n")


def _check_html_path(path: str, option: str) -> None:
    """Fail early (before the model loads) when the page could not be written; a FIFO is not opened yet."""
    check_output(path, label=option)


# -- thumbnails ------------------------------------------------------------------------------------------

def make_thumb(path: str) -> bytes | str:
    """A JPEG thumbnail of the file (long side THUMB_SIZE), or the reason there is none (worker entry)."""
    from pickrank.inputs.reader import ReadError, make_thumbnail, open_image, read_bytes

    try:
        return make_thumbnail(open_image(read_bytes(path)), THUMB_SIZE)
    except ReadError as e:
        return str(e)
    except Exception as e:  # a decoder bug costs one thumbnail, not the page
        return f"{type(e).__name__}: {e}"


def _thumb_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 1) // 2))


class _Thumbnails:
    """Thumbnails by path: submitted as records arrive, made in a small process pool once there are enough."""

    def __init__(self, workers: int | None = None, inline_below: int = INLINE_BELOW) -> None:
        self.workers = _thumb_workers() if workers is None else workers
        self.inline_below = inline_below
        self.items: dict[str, Future | bytes | str | None] = {}  # None: not submitted yet
        self.pending: list[str] = []
        self.pool: ProcessPoolExecutor | None = None

    def add(self, path: str) -> None:
        if path in self.items:
            return
        self.items[path] = None
        self.pending.append(path)
        if self.pool is None and self.workers > 0 and len(self.items) >= self.inline_below:
            self.pool = worker_pool(self.workers)
        if self.pool is not None:
            for p in self.pending:
                self.items[p] = self._submit(p)
            self.pending.clear()

    def _submit(self, path: str) -> Future | bytes | str:
        try:
            with signals_deferred():
                return self.pool.submit(make_thumb, path)  # type: ignore[union-attr]
        except Exception:  # pool broken or shut down: make it here
            return make_thumb(path)

    def collect(self) -> dict[str, bytes | str]:
        """Every thumbnail (bytes) or reason (str). A Ctrl-C while waiting skips the rest: placeholders."""
        out: dict[str, bytes | str] = {}
        try:
            for path, item in self.items.items():
                if isinstance(item, Future):
                    try:
                        item = item.result()
                    except Exception:  # the pool broke (a worker was killed): do it here
                        item = make_thumb(path)
                elif item is None:
                    item = make_thumb(path)
                out[path] = item
        except KeyboardInterrupt:
            print("pickrank: thumbnails skipped; writing the HTML page without the rest", file=sys.stderr)
            for path in self.items:
                out.setdefault(path, "thumbnail skipped")
        finally:
            self.shutdown()
        return out

    def shutdown(self) -> None:
        if self.pool is not None:
            close_pool(self.pool)
            self.pool = None


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
        _check_html_path(path, option)
        self.path = path
        self.option = option  # how error messages name the page: --html, or report's -o
        self.kind = kind if kind in _KINDS else "score"
        self.title = title
        self.meta: dict[str, object] = {}
        self.sections: list[list[Record]] = []
        self.thumbs = _Thumbnails(workers, inline_below)
        self.closed = False

    def set_meta(self, meta: dict) -> None:
        """The run's provenance (`Provenance.as_dict()`), or the model fields saved results carry."""
        self.meta.update(meta)  # None values too: a local folder's revision is None in the provenance

    def write(self, records: Iterable[Record]) -> None:
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
        out = Output(self.path, label=self.option)
        try:
            _Renderer(self, thumbs, folder, out.stream).page()
        except BrokenPipeError:  # the reader went away (| head): a quiet end, as for results on stdout
            out.discard()
            raise
        except OSError as e:  # a device that takes no more (/dev/full)
            out.discard()
            raise OutputError(f"{self.option} {self.path}: {e.strerror or e}") from None
        except BaseException:
            out.discard()
            raise
        out.close()


def _href(path: str, folder: str) -> str:
    """The image's URL relative to the page's folder (percent-encoded bytes, so any file name works)."""
    try:
        rel = os.path.relpath(os.path.abspath(path), folder)
    except ValueError:  # another drive (Windows): an absolute file URL
        return "file:///" + urllib.parse.quote(os.path.abspath(path).replace(os.sep, "/").lstrip("/"))
    rel = rel.replace(os.sep, "/")
    return urllib.parse.quote(os.fsencode(rel), safe="/")


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


class _Renderer:
    def __init__(self, report: HtmlReport, thumbs: dict[str, bytes | str], folder: str, out: IO[str]) -> None:
        self.r = report
        self.thumbs = thumbs
        self.folder = folder
        self.out = out
        self.ids: dict[str, str] = {}  # path -> id of the img that embeds its thumbnail (each embedded once)

    def w(self, *parts: str) -> None:
        self.out.write("".join(parts))

    def page(self) -> None:
        sections = self.r.sections
        scored = [r for s in sections for r in s if r.error is None]
        failed = [r for s in sections for r in s if r.error is not None]
        title = self.r.title or f"pickrank {self.r.kind}"
        meta = header_meta(self.r.meta) + [
            ("rankings", len(sections)), ("images ranked", len(scored)),
            ("distinct images", len({r.path for r in scored})), ("failed", len(failed))]
        self.w('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
               f'<meta http-equiv="Content-Security-Policy" content="{esc(_CSP)}">\n',
               '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
               '<meta name="generator" content="pickrank ', esc(__version__), '">\n',
               f"<title>{esc(title)}</title>\n<style>{_CSS}{PROVENANCE_CSS}</style>\n</head>\n<body>\n",
               f'<header>\n<h1>{esc(title)}<small>PickScore ranking</small></h1>\n<dl class="meta">')
        for k, v in meta:
            self.w(f"<div><dt>{esc(k)}</dt><dd data-k=\"{esc(k)}\">{esc('unknown' if v is None else v)}</dd></div>")
        self.w('</dl>\n</header>\n', provenance_block(self.r.meta), '<div class="tools"><input id="q" type="search" placeholder="Filter by prompt '
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
        win = r.rank == 1
        prob = max(0.0, min(1.0, r.prob or 0.0))
        caption = f"#{r.rank}  {name}  score {_fmt(r.score)}  prob {_fmt(r.prob)}"
        self.w(f'<div class="card{" win" if win else ""}" data-rank="{esc(r.rank if r.rank is not None else "")}" '
               f'data-score="{esc(r.score if r.score is not None else "")}" data-name="{esc(name.lower())}" '
               f'data-path="{esc(path)}" data-caption="{esc(caption)}">'
               f'<span class="badge">#{esc(r.rank)}{" best" if win else ""}</span>'
               f'<a class="th" href="{esc(_href(path, self.folder))}" title="{esc(path)}">')
        thumb = self.thumbs.get(path)
        alt = esc(name)
        if isinstance(thumb, bytes):
            if path in self.ids:
                self.w(f'<img data-t="{self.ids[path]}" alt="{alt}" loading="lazy" decoding="async">')
            else:
                tid = self.ids[path] = f"t{len(self.ids)}"
                self.w(f'<img id="{tid}" alt="{alt}" loading="lazy" decoding="async" '
                       f'src="data:image/jpeg;base64,{base64.b64encode(thumb).decode("ascii")}">')
        else:
            why = thumb if isinstance(thumb, str) else "no preview"
            self.w(f'<span class="ph" title="{esc(why)}">no preview<br>{esc(why)}</span>')
        self.w('</a><div class="info">'
               f'<div class="row"><b>{esc(_fmt(r.score))}</b><span>prob {esc(_fmt(r.prob))}</span></div>'
               f'<div class="bar" title="prob {esc(_fmt(r.prob))}"><i style="width:{prob * 100:.1f}%"></i></div>'
               f'<div class="name" title="{esc(path)}">{esc(name)}</div>')
        if r.copied_to:
            self.w(f'<div class="copied" title="{esc(r.copied_to)}">copied to {esc(r.copied_to)}</div>')
        self.w("</div></div>\n")


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
        data = json.loads(text)
    except ValueError:  # JSON Lines: one object per line
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
            data = wrapped[1] if wrapped is not None else json.loads(text)
        except ValueError as e:
            raise UsageError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        rows = [(f"{path} item {i + 1}", d) for i, d in enumerate(data)]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path} line {n}", json.loads(line)))
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


__all__ = ["HtmlReport", "load_results", "render_results", "esc", "make_thumb", "THUMB_SIZE"]
