"""Reading pages as a parser and as headless Chromium (Debian's, never a downloaded build) sees them."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

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
