"""What the HTML pages share: escaping, the CSP, the page head and its provenance block, thumbnails made in a
worker pool and embedded once each, image links, number formats, and the atomic write of the page.

A page's only script is built by `page_script` (its hash goes into the Content-Security-Policy, so no other
script can run); everything that comes from prompts, names or paths goes through `esc`.
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
from typing import IO, Callable, Sequence

from pickrank import __version__
from pickrank.errors import OutputError
from pickrank.inputs.workers import close_pool, worker_pool
from pickrank.output.targets import Output, check_output
from pickrank.signals import signals_deferred

THUMB_SIZE = 256
# Fewer images than this are thumbnailed in the main process at close (a pool's start-up costs more).
INLINE_BELOW = 16

# The header's style, the same on every page (each page's own style goes around it).
HEADER_CSS = """*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;background:var(--bg);
color:var(--ink)}
header{background:#1d2330;color:#fff;padding:14px 20px}
header h1{margin:0 0 6px;font-size:20px}
header h1 small{font-weight:normal;color:#aab3c5;font-size:13px;margin-left:8px}
dl.meta{display:flex;flex-wrap:wrap;gap:4px 18px;margin:0;font-size:13px;color:#cfd6e4}
dl.meta div{display:flex;gap:5px}dl.meta dt{color:#8e99ad}dl.meta dd{margin:0;overflow-wrap:anywhere}
"""

# The provenance block every page shows.
PROVENANCE_CSS = """
details.prov{margin:10px 20px 0;background:#fff;border:1px solid var(--line,#dde1e7);border-radius:8px;padding:6px 12px;
font-size:12px}details.prov summary{cursor:pointer;font-weight:600}
details.prov table{border-collapse:collapse;margin:6px 0}details.prov th{text-align:left;padding:2px 12px 2px 0;
vertical-align:top;color:#6a7282;font-weight:normal}details.prov td{overflow-wrap:anywhere;font-family:monospace}
"""

# A thumbnail embedded once: its other <img>s name it in data-t, and the script copies its source to them.
THUMBNAIL_JS = """d.querySelectorAll("img[data-t]").forEach(function(im){
  var src=d.getElementById(im.getAttribute("data-t"));if(src)im.src=src.src;});
"""


def page_script(body: str) -> str:
    """A page's only script: strict, `d` for the document, the shared thumbnails, `body`, then data-ready on the
    root element (what the browser tests wait for)."""
    return ('\n(function(){\n"use strict";\nvar d=document;\n' + THUMBNAIL_JS + body
            + 'd.documentElement.setAttribute("data-ready","1");\n})();\n')


def content_security_policy(script: str, images: str = "* data: file: blob:", connect: str | None = None) -> str:
    """The pages' policy: nothing fetched, inline styles, and only `script` (by its hash) may run; a page served
    by pickrank names where its images come from and what its script may fetch (`connect`)."""
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    fetch = f"connect-src {connect}; " if connect else ""
    return (f"default-src 'none'; img-src {images}; {fetch}style-src 'unsafe-inline'; "
            f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'")


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


def number(x: float | None, digits: int = 3) -> str:
    """A score with `digits` decimals; "-" for none."""
    return "-" if x is None else f"{x:.{digits}f}"


def interval(low: float | None, high: float | None, digits: int = 3) -> str:
    """[low, high] with `digits` decimals; "-" when either end is missing."""
    return "-" if low is None or high is None else f"[{low:.{digits}f}, {high:.{digits}f}]"


def href(path: str, folder: str) -> str:
    """The image's URL relative to the page's folder (percent-encoded bytes, so any file name works)."""
    try:
        rel = os.path.relpath(os.path.abspath(path), folder)
    except ValueError:  # another drive (Windows): an absolute file URL
        return "file:///" + urllib.parse.quote(os.path.abspath(path).replace(os.sep, "/").lstrip("/"))
    rel = rel.replace(os.sep, "/")
    return urllib.parse.quote(os.fsencode(rel), safe="/")


# -- the head --------------------------------------------------------------------------------------------

def header_meta(meta: dict) -> list[tuple[str, object]]:
    """The header's model items, from the provenance (or the fields saved results carry), and the date."""
    date = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()
    version = meta.get("pickrank") or (meta.get("versions") or {}).get("pickrank") or __version__
    head = meta.get("head")  # a preference head (--head): its file and SHA-256, beside the model
    tuned = [("head", f"{os.path.basename(head.get('path') or '?')} sha256:{(head.get('sha256') or '?')[:12]}")] \
        if isinstance(head, dict) else []
    return [("model", meta.get("model")), *tuned, ("revision", meta.get("revision")), ("dtype", meta.get("dtype")),
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


def page_head(title: str, subtitle: str, css: str, script: str, items: Sequence[tuple[str, object]],
              meta: dict, policy: str | None = None) -> str:
    """The page up to its body's content: the head (CSP for `script`, or `policy`; `css` with the provenance
    style), the header with the title and the `items` (name, value; None shows as unknown), and the provenance
    block."""
    policy = policy or content_security_policy(script)
    parts = ['<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
             f'<meta http-equiv="Content-Security-Policy" content="{esc(policy)}">\n',
             '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
             f'<meta name="generator" content="pickrank {esc(__version__)}">\n',
             f"<title>{esc(title)}</title>\n<style>{css}{PROVENANCE_CSS}</style>\n</head>\n<body>\n",
             f'<header>\n<h1>{esc(title)}<small>{esc(subtitle)}</small></h1>\n<dl class="meta">']
    parts += [f'<div><dt>{esc(k)}</dt><dd data-k="{esc(k)}">{esc("unknown" if v is None else v)}</dd></div>'
              for k, v in items]
    parts += ["</dl>\n</header>\n", provenance_block(meta)]
    return "".join(parts)


# -- thumbnails ------------------------------------------------------------------------------------------

def make_thumb(path: str) -> bytes | str:
    """A JPEG thumbnail of the file (long side THUMB_SIZE), or the reason there is none (worker entry)."""
    from pickrank.inputs.decode import make_thumbnail, open_image
    from pickrank.inputs.files import ReadError, read_bytes

    try:
        return make_thumbnail(open_image(read_bytes(path)), THUMB_SIZE)
    except ReadError as e:
        return str(e)
    except Exception as e:  # a decoder bug costs one thumbnail, not the page
        return f"{type(e).__name__}: {e}"


def _thumb_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 1) // 2))


class Thumbnails:
    """Thumbnails by path: submitted as images are added, made in a small process pool once there are enough."""

    def __init__(self, workers: int | None = None, inline_below: int = INLINE_BELOW) -> None:
        self.workers = _thumb_workers() if workers is None else workers
        self.inline_below = inline_below
        self.items: dict[str, Future | bytes | str | None] = {}  # None: not submitted yet
        self.pending: list[str] = []
        self.pool: ProcessPoolExecutor | None = None

    def add(self, path: str) -> None:
        """Ask for the file's thumbnail (once per path)."""
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
        """Stop the pool (the thumbnails not made yet are not needed)."""
        if self.pool is not None:
            close_pool(self.pool)
            self.pool = None


# -- writing a page --------------------------------------------------------------------------------------

class PageWriter:
    """Writes one page to `out`: its parts, links to images relative to the page's `folder`, and thumbnails
    (from `Thumbnails.collect`) embedded once each, later uses naming the first."""

    def __init__(self, out: IO[str], thumbs: dict[str, bytes | str], folder: str) -> None:
        self.out, self.thumbs, self.folder = out, thumbs, folder
        self.ids: dict[str, str] = {}  # path -> id of the img that embeds its thumbnail

    def w(self, *parts: str) -> None:
        """Write the parts, in order."""
        self.out.write("".join(parts))

    def href(self, path: str) -> str:
        """The image's URL relative to the page."""
        return href(path, self.folder)

    def thumb_img(self, key: str, attrs: str) -> str | None:
        """The <img> of `key`'s thumbnail with `attrs` (escaped by the caller); None when it has none (the
        reason, or None, is `self.thumbs.get(key)`)."""
        thumb = self.thumbs.get(key)
        if not isinstance(thumb, bytes):
            return None
        if key in self.ids:
            return f'<img data-t="{self.ids[key]}" {attrs}>'
        tid = self.ids[key] = f"t{len(self.ids)}"
        return f'<img id="{tid}" {attrs} src="data:image/jpeg;base64,{base64.b64encode(thumb).decode("ascii")}">'


def check_html(path: str, option: str = "--html") -> None:
    """Fail early (before the model loads) when the page could not be written; a FIFO is not opened yet."""
    check_output(path, label=option)


def write_page(path: str, option: str, render: Callable[[IO[str]], None]) -> None:
    """`render(stream)` into a temp file renamed onto `path` once complete; a failure leaves no page (and an earlier
    one as it was). OutputError names `option` when the device takes no more; a broken pipe ends quietly."""
    out = Output(path, label=option)
    try:
        render(out.stream)
    except BrokenPipeError:  # the reader went away (| head): a quiet end, as for results on stdout
        out.discard()
        raise
    except OSError as e:  # a device that takes no more (/dev/full)
        out.discard()
        raise OutputError(f"{option} {path}: {e.strerror or e}") from None
    except BaseException:
        out.discard()
        raise
    out.close()


__all__ = ["THUMB_SIZE", "INLINE_BELOW", "HEADER_CSS", "PROVENANCE_CSS", "THUMBNAIL_JS", "page_script",
           "content_security_policy", "esc", "number", "interval", "href", "header_meta", "provenance_block",
           "page_head", "make_thumb", "Thumbnails", "PageWriter", "check_html", "write_page"]
