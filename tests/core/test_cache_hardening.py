"""The cache never takes over a file that is not its own, reads a read-only cache,
refuses an empty `clear --model`; `eval` checks its text input before the model loads; no network fails fast in
one line; the score differences between cached, uncached, batched and parallel runs stay within float32 rounding.

Everything runs through the real CLI (typer's CliRunner, or a subprocess where stderr, timing or the network
matter) with real files, the tiny real CLIP of conftest.py, real SQLite and real sockets; nothing is mocked.
"""

from __future__ import annotations

import csv
import http.server
import itertools
import json
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pickrank.cli.app import app
from pickrank.core.cache import EmbeddingCache
from tests.support.commands import jsonl
from tests.support.databases import foreign_database
from tests.support.images import draw_image

PROMPT = "a red cat on a blue sofa"
APPLICATION_ID = int.from_bytes(b"PkRk", "big")  # what pickrank stamps at offset 68 of its caches' header


# -- helpers --------------------------------------------------------------------------------------------------

def scores(text: str) -> dict[str, float]:
    return {r["path"]: r["score"] for r in jsonl(text)}


def score(runner, model_dir, cache, images, *extra: str):
    """`pickrank score` in process with the tiny model and this cache file."""
    res = runner.invoke(app, ["score", "-p", PROMPT, "--model", str(model_dir), "--cache", str(cache),
                              "--workers", "0", *extra, str(images)])
    assert res.exit_code == 0, res.output
    return res


def pickrank(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (stderr exactly as a user sees it)."""
    return subprocess.run([sys.executable, "-m", "pickrank", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file in folder: content, mtime and mode (to prove nothing was written, moved or created)."""
    out = {}
    for p in sorted(folder.iterdir()):
        st = p.lstat()
        out[p.name] = (p.read_bytes() if stat.S_ISREG(st.st_mode) else b"", st.st_mtime_ns, st.st_mode)
    return out


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def entries(cache: Path) -> int:
    db = sqlite3.connect(f"file:{cache}?mode=ro", uri=True)
    try:
        return db.execute("SELECT count(*) FROM embeddings").fetchone()[0]
    finally:
        db.close()


def header_app_id(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[68:72], "big")


# -- a file that is not pickrank's cache is never moved or written -------------------------------------

NOT_CACHES = {
    "text": lambda p: p.write_text("my notes, not a database\n" * 50),
    "short-sqlite-prefix": lambda p: p.write_bytes(b"SQLite format 3\x00 but only a prefix"),
    "sqlite-rollback": lambda p: foreign_database(p, "delete"),
    "sqlite-wal": lambda p: foreign_database(p, "wal"),
}


@pytest.mark.parametrize("kind", list(NOT_CACHES))
def test_a_run_leaves_a_file_that_is_not_a_cache_untouched(runner, model_dir, images, tmp_path, kind):
    folder = tmp_path / "mine"
    folder.mkdir()
    target = folder / "precious.db"
    NOT_CACHES[kind](target)
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))  # an old mtime: any write would change it
    before = snapshot(folder)
    res = score(runner, model_dir, target, images)
    assert len(jsonl(res.stdout)) == 6  # the run went on, without the cache
    assert "6 embedded, 0 from cache" in res.stderr
    warnings = [line for line in stderr_lines(res.stderr) if "warning" in line]
    assert len(warnings) == 1 and "not a pickrank cache" in warnings[0] and str(target) in warnings[0], res.stderr
    assert snapshot(folder) == before  # same bytes, same mtime, nothing moved aside, no -wal/-shm next to it


@pytest.mark.parametrize("kind", ["text", "sqlite-rollback", "sqlite-wal"])
@pytest.mark.parametrize("command", [["info"], ["clear"], ["prune", "--older-than", "0"]])
def test_cache_commands_refuse_a_file_that_is_not_a_cache(tmp_path, kind, command):
    target = tmp_path / "precious.db"
    NOT_CACHES[kind](target)
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))
    before = snapshot(tmp_path)
    res = pickrank("cache", *command, "--cache", str(target))
    assert res.returncode == 1, res.stderr
    assert stderr_lines(res.stderr) == [res.stderr.strip()] and "not a pickrank cache" in res.stderr
    assert res.stderr.startswith("pickrank: error: ") and res.stdout == ""
    assert snapshot(tmp_path) == before


def test_a_fifo_or_a_folder_at_the_cache_path_is_not_opened(model_dir, images, tmp_path):
    fifo = tmp_path / "fifo.db"
    os.mkfifo(fifo)
    (tmp_path / "folder.db").mkdir()
    for target in (fifo, tmp_path / "folder.db"):
        res = pickrank("score", "-p", PROMPT, "--model", str(model_dir), "--cache", str(target), "--workers", "0",
                       str(images), timeout=60)  # opening the FIFO would block: the timeout proves it was not
        assert res.returncode == 0, res.stderr
        assert len(jsonl(res.stdout)) == 6 and "disabled for this run" in res.stderr
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and list((tmp_path / "folder.db").iterdir()) == []


def test_an_empty_file_becomes_a_cache(runner, model_dir, images, tmp_path):
    # Decision: a 0-byte file holds nothing to lose, so it is initialised (as `touch cache.db` would suggest).
    target = tmp_path / "empty.db"
    target.touch()
    res = score(runner, model_dir, target, images)
    assert "warning" not in res.stderr
    assert header_app_id(target) == APPLICATION_ID and entries(target) == 6
    locked = tmp_path / "locked.db"  # unless its mode says not to write it
    locked.touch()
    locked.chmod(0o444)
    res = score(runner, model_dir, locked, images)
    assert "an empty read-only file; left untouched" in res.stderr and locked.stat().st_size == 0


def test_new_caches_are_stamped_and_old_unstamped_ones_are_still_used(runner, model_dir, images, tmp_path):
    cache = tmp_path / "c.db"
    score(runner, model_dir, cache, images)
    assert header_app_id(cache) == APPLICATION_ID  # "PkRk" at offset 68 of the SQLite header
    db = sqlite3.connect(cache)  # what a cache made before the stamp looks like: the schema, application_id 0
    db.execute("PRAGMA application_id=0")
    db.close()
    assert header_app_id(cache) == 0
    res = score(runner, model_dir, cache, images)
    assert "0 embedded, 6 from cache" in res.stderr and "warning" not in res.stderr
    assert header_app_id(cache) == APPLICATION_ID  # recognised by its schema, then stamped


# -- an empty --model pattern; a read-only cache ----------------------------------------------------

@pytest.mark.parametrize("pattern", ["", "   "])
def test_clear_with_an_empty_model_pattern_is_a_usage_error(runner, model_dir, images, tmp_path, pattern):
    cache = tmp_path / "c.db"
    score(runner, model_dir, cache, images)
    res = pickrank("cache", "clear", "--model", pattern, "--cache", str(cache))
    assert res.returncode == 2, res.stderr
    assert stderr_lines(res.stderr) == ["pickrank: error: --model must not be empty: leave it out to clear every "
                                        "entry"]
    assert entries(cache) == 6


def test_a_read_only_cache_is_read_and_the_commands_say_so(runner, model_dir, images, tmp_path):
    cache = tmp_path / "c.db"
    score(runner, model_dir, cache, images)
    cache.chmod(0o444)  # as root too: the mode says read-only, so pickrank treats it so
    try:
        content = cache.read_bytes()
        draw_image(images / "new.png", (90, 90), seed=99)
        res = score(runner, model_dir, cache, images)
        assert "1 embedded, 6 from cache" in res.stderr  # hits read, the new image embedded
        read_only = [line for line in stderr_lines(res.stderr) if "read-only" in line]
        assert read_only == [f"pickrank: warning: embedding cache {cache} is read-only: cached embeddings are "
                             "used, new ones are not saved"]
        assert cache.read_bytes() == content and entries(cache) == 6  # nothing was saved

        info = pickrank("cache", "info", "--cache", str(cache))
        assert info.returncode == 0, info.stderr
        assert "entries: 6" in info.stdout and "read-only" in info.stdout and info.stderr == ""
        for command in (["clear"], ["clear", "--model", str(model_dir)], ["prune", "--older-than", "0"]):
            res = pickrank("cache", *command, "--cache", str(cache))
            assert res.returncode == 1, res.stderr
            assert stderr_lines(res.stderr) == [f"pickrank: error: {cache} is read-only: cannot delete entries "
                                                "(make it writable first)"]
            assert "deleted" not in res.stdout
        assert cache.read_bytes() == content and entries(cache) == 6
    finally:
        cache.chmod(0o644)


def test_an_sqlite_error_in_a_cache_command_is_one_line(tmp_path):
    cache = tmp_path / "c.db"
    c = EmbeddingCache(cache)
    rng = np.random.default_rng(0)
    c.put_many({f"{i:064x}": rng.standard_normal(32).astype(np.float32) for i in range(2000)}, "m")
    c.close()
    data = bytearray(cache.read_bytes())
    pages = len(data) // 4096
    data[pages // 2 * 4096:(pages // 2 + 5) * 4096] = b"\xab" * 5 * 4096  # table pages the open does not touch
    cache.write_bytes(bytes(data))
    res = pickrank("cache", "info", "--cache", str(cache))
    assert res.returncode == 1
    assert stderr_lines(res.stderr) == [f"pickrank: error: {cache}: database disk image is malformed"]


# -- eval's CSV/JSONL must be UTF-8, checked before the model loads -----------------------------------

def eval_rows(tmp_path: Path) -> list[list[str]]:
    a = draw_image(tmp_path / "a.png", (64, 64), seed=1)
    b = draw_image(tmp_path / "b.png", (64, 64), seed=2)
    return [["prompt", "image_0", "image_1", "label"], [PROMPT, a.name, b.name, "0"], ["the sea", a.name, b.name,
                                                                                         "1"]]


def test_eval_on_a_csv_that_is_not_utf8_fails_before_the_model_loads(runner, tmp_path):
    rows = eval_rows(tmp_path)
    data = tmp_path / "pairs.csv"
    with open(data, "w", newline="", encoding="latin-1") as f:
        w = csv.writer(f)
        w.writerows(rows[:2] + [["un café crème", *rows[2][1:]]])  # é is 0xe9 in latin-1: not UTF-8
    bad_byte = data.read_bytes().index(b"\xe9")
    # A model folder that does not exist: had the model been loaded first, the error would be about it.
    res = runner.invoke(app, ["eval", str(data), "--model", str(tmp_path / "no-model"), "--bootstrap", "0"])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip() == (f"pickrank: error: {data}: not UTF-8 (line 3, byte {bad_byte}: b'\\xe9'); "
                                  "save it as UTF-8")


def test_eval_jsonl_and_validation_files_are_checked_too(runner, model_dir, tmp_path):
    rows = eval_rows(tmp_path)
    good = tmp_path / "good.csv"
    with open(good, "w", newline="", encoding="utf-8-sig") as f:  # a BOM is fine
        csv.writer(f).writerows(rows)
    lines = [json.dumps(dict(zip(rows[0], r))) for r in rows[1:]]
    bad_jsonl = tmp_path / "pairs.jsonl"
    bad_jsonl.write_bytes(lines[0].encode() + b"\n" + lines[1].encode().replace(b"the sea", b"the s\xffa") + b"\n")
    res = runner.invoke(app, ["eval", str(bad_jsonl), "--model", str(tmp_path / "no-model")])
    assert res.exit_code == 2 and "pairs.jsonl: not UTF-8 (line 2," in res.stderr, res.output
    res = runner.invoke(app, ["eval", str(good), "--validation", str(bad_jsonl), "--model",
                              str(tmp_path / "no-model")])
    assert res.exit_code == 2 and "pairs.jsonl: not UTF-8 (line 2," in res.stderr, res.output
    no_label = tmp_path / "no_label.csv"
    no_label.write_text("prompt,image_0,image_1\nx,a.png,b.png\n")
    res = runner.invoke(app, ["eval", str(no_label), "--model", str(tmp_path / "no-model")])
    assert res.exit_code == 2 and "missing column(s) label" in res.stderr, res.output
    res = runner.invoke(app, ["eval", str(good), "--model", str(model_dir), "--bootstrap", "0", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["pairs"] == 2


def test_batch_names_the_right_byte_after_a_bom(runner, model_dir, tmp_path):
    # The same helper reads batch's prompts CSV: the byte offset counts the BOM, as an editor does.
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt\nun caf\xe9\n")
    res = runner.invoke(app, ["batch", str(path), str(tmp_path), "--model", str(tmp_path / "no-model")])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip() == f"pickrank: error: {path}: not UTF-8 (line 2, byte 16: b'\\xe9'); save it as UTF-8"


# -- no network, no --model: one line, at once ------------------------------------------------------

def hub_env(tmp_path: Path, endpoint: str, **extra: str) -> dict:
    """A user's environment with an empty hub cache, the network allowed, and the hub at `endpoint`."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=endpoint, **extra)
    return env


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: connecting is refused


@pytest.mark.timing
def test_default_model_without_network_fails_fast_in_one_line(images, tmp_path):
    env = hub_env(tmp_path, f"http://127.0.0.1:{closed_port()}")
    start = time.monotonic()
    res = pickrank("score", "-p", PROMPT, "--no-cache", str(images), env=env, timeout=60)
    elapsed = time.monotonic() - start
    assert res.returncode == 1
    lines = stderr_lines(res.stderr)
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("pickrank: error: cannot reach the Hugging Face hub to fetch "
                               "yuvalkirstain/PickScore_v1: ")
    assert "--model FOLDER" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0] and "download" in lines[0]
    assert elapsed < 10, elapsed  # huggingface_hub alone retries for ~24 s
    res = pickrank("score", "-p", PROMPT, "--model", str(tmp_path / "no-such-folder"), "--no-cache", str(images),
                   env=env, timeout=60)
    assert res.returncode == 1  # a missing folder is not a hub id: no probe, the usual message
    assert stderr_lines(res.stderr) == [f"pickrank: error: cannot load {tmp_path / 'no-such-folder'}: no such "
                                        "folder, and not a hub id"]


@pytest.mark.timing
def test_a_hub_that_never_answers_fails_within_the_etag_timeout(images, tmp_path):
    with socket.socket() as silent:  # accepts connections (the kernel does) but never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        env = hub_env(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}", HF_HUB_ETAG_TIMEOUT="1")
        start = time.monotonic()
        res = pickrank("score", "-p", PROMPT, "--no-cache", str(images), env=env, timeout=60)
        elapsed = time.monotonic() - start
    assert res.returncode == 1
    lines = stderr_lines(res.stderr)
    assert len(lines) == 1 and "cannot reach the Hugging Face hub" in lines[0] and "within 1 s" in lines[0], lines
    assert elapsed < 10, elapsed  # without the probe: 6 tries with a 60 s timeout each


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Serves the files of one folder as every repo's `main` commit, with the headers the hub sends."""

    folder: Path
    commit = "0123456789abcdef0123456789abcdef01234567"

    def _send(self, body: bool) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        name = parts[-1] if len(parts) >= 5 and parts[2] == "resolve" else None
        path = self.folder / name if name else None
        if path is None or not path.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", self.commit)
        self.send_header("ETag", f'"{abs(hash(data))}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self) -> None:  # noqa: N802 - the http.server API
        self._send(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._send(body=True)

    def log_message(self, *args) -> None:
        pass


def test_the_hub_path_still_downloads_and_reports_missing_repos(model_dir, images, tmp_path):
    handler = type("Hub", (_FakeHub,), {"folder": model_dir})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = hub_env(tmp_path, f"http://127.0.0.1:{server.server_address[1]}")
        code = ("from pickrank.models.source import ModelSource, inspect_model; "
                "info = inspect_model(ModelSource('someone/clip', 'someone/clip')); print(info.fingerprint)")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
        assert res.returncode == 0, res.stderr  # the probe passed, config and preprocessor came over the network
        assert res.stdout.startswith(f"someone/clip@{_FakeHub.commit}|fp32|")
        handler.folder = tmp_path / "nothing-here"  # the hub answers 404: its own error, not "cannot reach"
        res = pickrank("score", "-p", PROMPT, "--model", "someone/gone", "--no-cache", str(images), env=env,
                       timeout=60)
        assert res.returncode == 1 and "cannot load someone/gone" in res.stderr, res.stderr
        assert "cannot reach" not in res.stderr and len(stderr_lines(res.stderr)) == 1
    finally:
        server.shutdown()
        server.server_close()


# -- what "cached scores equal uncached ones" really means ------------------------------------------

def test_cached_uncached_batched_and_parallel_scores_agree_within_float32_rounding(runner, model_dir, images,
                                                                                   tmp_path):
    cache = tmp_path / "c.db"

    def run(*extra: str) -> dict[str, float]:
        res = runner.invoke(app, ["score", "-p", PROMPT, "--model", str(model_dir), *extra, str(images)])
        assert res.exit_code == 0, res.output
        return scores(res.stdout)

    runs = {
        "fill --workers 0": run("--cache", str(cache), "--workers", "0"),
        "hit --workers 0": run("--cache", str(cache), "--workers", "0"),
        "hit --workers 2": run("--cache", str(cache), "--workers", "2"),
        "no cache --workers 0": run("--no-cache", "--workers", "0"),
        "no cache --workers 1": run("--no-cache", "--workers", "1"),
        "no cache --workers 2": run("--no-cache", "--workers", "2"),
        "no cache --batch-size 1": run("--no-cache", "--workers", "0", "--batch-size", "1"),
        "no cache --batch-size 2": run("--no-cache", "--workers", "0", "--batch-size", "2"),
    }
    # The embedding read from the cache is the one computed, bit for bit: with the same thread count for the
    # text tower (no decode workers, or a model too big for pickrank to change it), a hit scores what the
    # filling run scored.
    assert runs["hit --workers 0"] == runs["hit --workers 2"] == runs["fill --workers 0"]
    assert runs["fill --workers 0"] == runs["no cache --workers 0"]  # same batches, same threads
    # Otherwise float32 results depend on how images are batched and on the thread count: the last bits differ.
    worst = max(abs(a[k] - b[k]) for a, b in itertools.combinations(runs.values(), 2) for k in a)
    assert worst <= 1e-5, worst
