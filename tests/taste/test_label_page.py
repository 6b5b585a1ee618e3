"""`pickrank label` driven as a labeller drives it: the real command on a free loopback port, its page in headless
Chromium (Debian's, through the DevTools protocol), keys pressed. labels.jsonl must hold exactly what was chosen,
undo must take a label back, a restart must resume, and nothing outside SOURCE can be fetched."""

from __future__ import annotations

import http.client
import json
import os
import re
import urllib.parse
from pathlib import Path

import httpx
import pytest

from pickrank.cli.app import app
from pickrank.taste.labels import read_labels
from pickrank.taste.pairs import Pool, pool_from_source
from tests.support.browser import EVIL, Browser, require_chromium
from tests.support.commands import cli, no_traceback
from tests.support.images import draw_image
from tests.support.labelling import running_label
from tests.support.server import group_gone

PROMPT = "a red cat & a <b>blue</b> dog " + EVIL


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """Two best-of-n groups of three (six pairs), one prompt full of markup; and a file beside them, outside."""
    for g, prompt in (("g0", PROMPT), ("g1", "a bowl of fruit")):
        (tmp_path / "src" / g).mkdir(parents=True)
        (tmp_path / "src" / g / "prompt.txt").write_text(prompt, encoding="utf-8")
        for i in range(3):
            draw_image(tmp_path / "src" / g / f"{i}.png", (96 + 8 * i, 64), seed=10 * i + len(g + prompt))
    draw_image(tmp_path / "secret.png", (32, 32), seed=99)
    return tmp_path / "src"


def _shown(browser: Browser) -> tuple[int, int, int]:
    """(the pair's id, its left and right candidate ids) as the page shows them."""
    main = browser.js('[...["data-pair","data-left","data-right"]].map(k=>document.querySelector("main")'
                      '.getAttribute(k))')
    return int(main[0]), int(main[1]), int(main[2])


def _press(browser: Browser, key: str, seen: set[str] | None = None) -> None:
    """Press a key and wait until the page has shown what the server answered (its prompt joins `seen`)."""
    before = int(browser.js('document.querySelector("main").getAttribute("data-shown")'))
    browser.press(key)
    browser.wait_for(f'Number(document.querySelector("main").getAttribute("data-shown")) > {before} || '
                     '/Every pair is labelled/.test(document.getElementById("prompt").textContent)')
    if seen is not None:
        seen.add(browser.js('document.getElementById("prompt").textContent'))


def _open(browser: Browser, url: str) -> None:
    browser.goto(url + "/")
    browser.wait_for('document.documentElement.getAttribute("data-ready") && '
                     'document.querySelector("main").getAttribute("data-shown") !== "0"')


def _labelled(labels: Path, pool: Pool) -> list[tuple[int, int, float]]:
    """The file's labels as (image_0's id, image_1's id, label)."""
    ids = {c.path: i for i, c in enumerate(pool.candidates)}
    return [(ids[lab.image_0], ids[lab.image_1], lab.label) for lab in read_labels(str(labels))]


def test_keys_label_tie_skip_and_undo_and_a_restart_resumes(source: Path, model_dir: Path, tmp_path: Path,
                                                            runner) -> None:
    require_chromium()
    pool = pool_from_source([str(source)])  # the ids the page asks for: candidates in this order
    labels = tmp_path / "labels.jsonl"
    args = (str(source), "--labels", str(labels), "--labeler", "ann", "--model", str(model_dir))
    expected: list[tuple[int, int, float]] = []
    seen: set[str] = set()  # the prompts the page showed
    with Browser(tmp_path / "profile") as browser:
        with running_label(*args) as session:
            _open(browser, session.url)
            assert browser.js("document.title") == "pickrank label" and not browser.js(
                'document.getElementById("pwned")')
            for key, value in (("ArrowLeft", 0.0), ("2", 1.0), ("ArrowDown", 0.5)):
                _, left, right = _shown(browser)
                _press(browser, key, seen)
                expected.append((left, right, value))
            assert _labelled(labels, pool) == expected  # each label on disk as soon as the page moved on
            _press(browser, "u")  # the tie is taken back, its pair shown again
            expected.pop()
            assert _shown(browser)[1:] == (left, right) and _labelled(labels, pool) == expected
            _press(browser, "1")
            expected.append((left, right, 0.0))
            skipped = _shown(browser)[1:]
            _press(browser, " ")  # skip: nothing written
            _press(browser, "Backspace")  # undo the skip: its pair again, nothing removed
            assert _shown(browser)[1:] == skipped
            _press(browser, "0")
            expected.append((*skipped, 0.5))
            page_text = browser.js("document.body.innerText")
            state = httpx.get(session.url + "/api/state", timeout=10).json()
            assert session.stop() in (0, 130)
            assert group_gone(session.proc.pid)
            no_traceback("".join(session.stderr))
        assert _labelled(labels, pool) == expected
        # a counter, and never a score (it would bias the labeller): no number with decimals, no score field
        assert "4 labelled (4 this session) \u00b7 6 pairs over 2 prompts" in page_text
        assert not re.search(r"\d\.\d", page_text) and not {"score", "scores"} & set(state) \
            and set(state["current"] or {}) <= {"id", "prompt", "left", "right"}
        rows = [json.loads(line) for line in labels.read_text().splitlines()]
        assert all(r["labeler"] == "ann" and r["chosen_by"] in ("uncertain", "random") and r["time"] and r["id"]
                   and not os.path.isabs(r["image_0"]) for r in rows)
        assert {r["prompt"] for r in rows} <= {PROMPT, "a bowl of fruit"}

        with running_label(*args, "--order", "random") as session:  # a restart: the two pairs left, then the end
            _open(browser, session.url)
            assert "4 labelled" in browser.js("document.body.innerText")
            for _ in range(2):
                _, left, right = _shown(browser)
                _press(browser, "ArrowRight", seen)
                expected.append((left, right, 1.0))
            assert "Every pair is labelled" in browser.js('document.getElementById("prompt").textContent')
    assert _labelled(labels, pool) == expected
    assert seen == {PROMPT, "a bowl of fruit", "Every pair is labelled. Thank you!"}  # shown as text, as written
    assert len({frozenset(p[:2]) for p in expected}) == 6 == sum(pool.pair_count(s) for s in pool.slots)
    res = runner.invoke(app, ["eval", str(labels), "--model", str(model_dir), "--json"])  # the format eval reads
    assert res.exit_code == 0 and json.loads(res.stdout)["pairs"] == 6, res.output


def _raw_get(url: str, path: str, host: str | None = None) -> int:
    """The status of a GET of `path` exactly as written (no client normalising '..' away)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=host is not None)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_nothing_outside_source_is_served(source: Path, tmp_path: Path) -> None:
    pool = pool_from_source([str(source)])
    secret = tmp_path / "secret.png"
    with running_label(str(source), "--labels", str(tmp_path / "l.jsonl"), "--order", "random") as session:
        url = session.url
        page = httpx.get(url + "/", timeout=10)
        assert page.status_code == 200
        policy = page.headers["content-security-policy"]
        assert "img-src 'self'" in policy and "connect-src 'self'" in policy and "script-src 'sha256-" in policy
        assert not any(c.path in page.text for c in pool.candidates)  # pictures by id, never by path
        assert _raw_get(url, "/img/0") == 200
        for path in (f"/img/{len(pool.candidates)}", "/img/-1", "/img/0x1", "/img/1.png", "/img/../secret.png",
                     "/img/..%2F..%2Fsecret.png", "/secret.png", str(secret), "/img/" + str(secret),
                     "/img/" + urllib.parse.quote(str(secret), safe=""), "/" + pool.candidates[0].path,
                     "/src/g0/0.png", "/%2e%2e/secret.png"):
            assert _raw_get(url, path) == 404, path
        assert _raw_get(url, "/img/0", host="evil.example:80") == 403  # a DNS-rebinding page's request
        answer = httpx.post(url + "/api/answer", data={"pair": "1", "answer": "left"}, timeout=10)
        assert answer.status_code == 415  # a cross-site form cannot answer
    no_traceback("".join(session.stderr))


def test_listening_beyond_loopback_needs_a_token(source: Path, model_dir: Path, runner, tmp_path: Path) -> None:
    res = cli(runner, model_dir, "label", str(source), "--labels", str(tmp_path / "l.jsonl"), "--host", "0.0.0.0")
    assert res.exit_code == 2 and "token" in res.stderr, res.output
    assert not (tmp_path / "l.jsonl").exists()


def test_a_token_opens_the_page_once_then_a_cookie_carries_it(source: Path, tmp_path: Path) -> None:
    with running_label(str(source), "--labels", str(tmp_path / "l.jsonl"), "--order", "random",
                       env={"PICKRANK_TOKEN": "s3cret-token"}) as session:
        url = session.url
        assert "?token=s3cret-token" in "".join(session.stderr)
        assert httpx.get(url + "/", timeout=10).status_code == 401
        assert httpx.get(url + "/?token=wrong", timeout=10).status_code == 401
        login = httpx.get(url + "/?token=s3cret-token", timeout=10)
        assert login.status_code == 303 and "HttpOnly" in login.headers["set-cookie"]
        with httpx.Client(cookies=login.cookies, timeout=10) as client:
            assert client.get(url + "/").status_code == 200
            assert client.get(url + "/api/state").json()["current"] is not None
        bearer = {"Authorization": "Bearer s3cret-token"}
        assert httpx.get(url + "/img/0", headers=bearer, timeout=10).status_code == 200
        assert httpx.get(url + "/img/0", timeout=10).status_code == 401
    no_traceback("".join(session.stderr))
