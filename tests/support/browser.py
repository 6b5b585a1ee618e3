"""Reading pages as a parser and as headless Chromium (Debian's, never a downloaded build) sees them; and driving
one (`Browser`) through its DevTools protocol over a pipe (`--remote-debugging-pipe`: JSON messages ended by NUL on
file descriptors 3 and 4), with nothing but the standard library: no websocket, no driver, no browser download.
Enough for the label page: open a URL, evaluate JavaScript, press keys."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

# Would change the title and add an element if it ever ran.
EVIL = '<script>document.title="pwned";document.body.insertAdjacentHTML("beforeend","<p id=pwned>x</p>")</script>'
EVIL_SYSTEM = '<b id=pwned4>"dpo"</b>'  # a system name with markup and quotes


class Page(HTMLParser):
    """What the tests look at: tags with attributes in order, scripts, cards, sections, failed items."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self.title = ""
        self._in: str | None = None
        self._text: list[str] = []
        self.texts: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in ("script", "title"):
            self._in, self._text = tag, []

    def handle_endtag(self, tag):
        if tag == self._in:
            if tag == "script":
                self.scripts.append("".join(self._text))
            elif not self.title:  # the document's title (SVG charts have <title>s of their own, later)
                self.title = "".join(self._text)
            self._in = None

    def handle_data(self, data):
        self.texts.append(data)
        if self._in:
            self._text.append(data)

    def find(self, tag: str, cls: str | None = None) -> list[dict]:
        return [a for t, a in self.tags if t == tag and (cls is None or cls in (a.get("class") or "").split())]

    @property
    def cards(self) -> list[dict]:
        return self.find("div", "card")

    def sections(self) -> list[list[dict]]:
        """The cards of each section, in document order."""
        out: list[list[dict]] = []
        for t, a in self.tags:
            if t == "section":
                out.append([])
            elif t == "div" and "card" in (a.get("class") or "").split():
                out[-1].append(a)
        return out

    @property
    def text(self) -> str:
        return "".join(self.texts)


def check_common(page: Page, html_text: str) -> None:
    """What every page promises: one script (ours), thumbnails as data URIs, nothing fetched over the network."""
    assert page.scripts and len(page.scripts) == 1 and "pwned" not in page.scripts[0]
    for tag, attrs in page.tags:
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            assert not value.lower().startswith(("http:", "https:", "//")), (tag, attrs)
    for img in page.find("img"):
        if img.get("src") or img.get("data-t"):
            assert img.get("loading") == "lazy"
        if img.get("src"):
            assert img["src"].startswith("data:image/jpeg;base64,")
    assert "http://" not in html_text.replace("http://www.w3.org", "") and "https://" not in html_text


def chromium_binary() -> str | None:
    for name in (os.environ.get("PICKRANK_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic", "--hide-scrollbars"]


def require_chromium() -> str:
    exe = chromium_binary()
    if exe is None:
        pytest.skip("Chromium not found: install it to run the browser test (Debian/Ubuntu: apt-get install "
                    "chromium; .ci/run installs it) or set PICKRANK_CHROMIUM to the browser")
    return exe


def chromium(tmp_path: Path, page: Path, *args: str) -> str:
    """Run headless Chromium on the page (a fresh profile each time) and return its stdout."""
    exe = require_chromium()
    profile = tmp_path / f"profile-{time.monotonic_ns()}"
    proc = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


# The harness around a page laid out in a frame: `fields` (JavaScript object members over `d`, the page's document,
# with `box`, `all` and `texts` to hand) are measured once the frame has loaded, with what every test checks.
_FRAME_MEASURE = """
var f=document.getElementById("f");
f.addEventListener("load",function(){
var d=f.contentDocument,root=d.documentElement;
function box(e){var r=e.getBoundingClientRect();return [r.left,r.top,r.width,r.height];}
function all(sel){return Array.prototype.map.call(d.querySelectorAll(sel),box);}
function texts(sel){return Array.prototype.map.call(d.querySelectorAll(sel),function(t){return t.textContent;});}
document.body.setAttribute("data-measure",JSON.stringify({
  ready:root.getAttribute("data-ready"), overflow:root.scrollWidth-root.clientWidth, width:root.clientWidth,
  FIELDS}));
});
"""


def measure_in_frame(tmp_path: Path, page_file: Path, width: int, fields: str) -> dict:
    """The layout of `page_file` in a frame `width` px wide (Chromium's window is never narrower than 500 px), as
    the harness measured `fields`; the page's own script must have run (its CSP allows it)."""
    import html
    import json

    page_html = html.escape(page_file.read_text(encoding="utf-8"), quote=True)
    harness = page_file.with_name(f"harness-{width}-{page_file.name}")
    harness.write_text(f'<!DOCTYPE html><html><body style="margin:0"><iframe id="f" style="border:0;width:{width}px;'
                       f'height:1000px" srcdoc="{page_html}"></iframe><script>'
                       f'{_FRAME_MEASURE.replace("FIELDS", fields)}</script></body></html>', encoding="utf-8")
    dom = chromium(tmp_path, harness, f"--window-size={width + 100},1100", "--dump-dom")
    measured = json.loads(Page(dom).find("body")[0]["data-measure"])
    assert measured["ready"] == "1"
    return measured


# What Input.dispatchKeyEvent needs to make each key the page listens to.
KEYS = {"ArrowLeft": ("ArrowLeft", 37), "ArrowRight": ("ArrowRight", 39), "ArrowDown": ("ArrowDown", 40),
        " ": ("Space", 32), "u": ("KeyU", 85), "1": ("Digit1", 49), "2": ("Digit2", 50), "0": ("Digit0", 48),
        "Backspace": ("Backspace", 8)}


class Browser:
    """One headless Chromium with one page; `close()` (or the with-block) always ends it."""

    def __init__(self, profile: Path, width: int = 1400, height: int = 900) -> None:
        exe = require_chromium()
        to_chrome, self._theirs_in = os.pipe()  # we write commands to _theirs_in; Chromium reads fd 3
        self._ours_out, from_chrome = os.pipe()  # Chromium writes fd 4; we read _ours_out

        def fds() -> None:
            # Chromium reads fd 3 and writes fd 4: copies of the pipe ends above 10 first (one of them may be 3
            # or 4), then onto 3 and 4, inheritable (os.pipe's own ends close at exec)
            import fcntl

            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome, from_chrome)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}",
                                      f"--window-size={width},{height}", "about:blank"],
                                     preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer, self._next = b"", 0
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.call("Page.enable", session=True)
            self.call("Runtime.enable", session=True)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self._ours_out], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._ours_out, 1 << 20)
            if not chunk:
                raise EOFError("Chromium went away")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def call(self, method: str, session: bool = False, timeout: float = 30, **params: Any) -> dict:
        """Send a command and wait for its result (events meanwhile are dropped)."""
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._theirs_in, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._read(timeout)
            if answer.get("id") == self._next:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def goto(self, url: str) -> None:
        self.call("Page.navigate", session=True, url=url)

    def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 30) -> Any:
        """Poll a JavaScript expression until it is truthy; its value."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {expression}")

    def press(self, key: str) -> None:
        """A key press (down and up) as a user's."""
        code, vk = KEYS[key]
        text = {"text": key} if len(key) == 1 else {}
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", session=True, type=kind, key=key, code=code,
                      windowsVirtualKeyCode=vk, nativeVirtualKeyCode=vk, **(text if kind == "keyDown" else {}))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:  # already gone
            pass
        for fd in (self._theirs_in, self._ours_out):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
