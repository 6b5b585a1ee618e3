"""`pickrank serve` against careless and hostile clients (a real server subprocess on a free loopback port, the tiny
real CLIP; nothing mocked): one client's bad text never fails another's batch, bodies and headers have a deadline,
connections and bodies in memory are bounded, SIGTERM ends in time with exit 0, and every error is JSON."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save

from pickrank.api import PickScorer
from tests.support.commands import no_traceback, pickrank_cmd
from tests.support.server import (
    POSTS,
    RTOL,
    TOL,
    Server,
    as_json,
    drawn,
    group_gone,
    post_json,
    running_server,
    scores_of,
)

READ_TIMEOUT_S = 2  # what --read-timeout-s gives a client here: the held bodies below end with it
GUARDED = ("--max-batch", "8", "--max-wait-ms", "40", "--max-images", "12", "--max-queue", "10", "--max-body-mb", "1",
           "--max-inflight-mb", "4", "--max-pixels", "100000", "--read-timeout-s", str(READ_TIMEOUT_S),
           "--max-connections", "16", "--grace-s", "5")
ST = {"content-type": "application/x-safetensors"}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[Server]:
    """One server for the module; the last test stops it with SIGTERM."""
    with running_server(model_dir, *GUARDED) as s:
        s.wait_ready()
        yield s


# -- raw HTTP ---------------------------------------------------------------------------------------------------

def port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def raw(server: Server, data: bytes, timeout: float = 30) -> bytes:
    """Send bytes on a fresh connection and read until the server closes it (bounded by `timeout`)."""
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=timeout) as s:
        if data:
            s.sendall(data)
        return read_all(s)


def read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def parsed(answer: bytes) -> tuple[int, dict[str, str], dict]:
    """(status, headers, JSON body) of a raw HTTP answer; the body must be JSON with an "error"."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:]))
    assert headers.get("content-type", "").startswith("application/json"), answer
    doc = json.loads(body)
    assert isinstance(doc.get("error"), str), answer
    return int(lines[0].split()[1]), headers, doc


def held_body(server: Server, declared: int = 100_000) -> socket.socket:
    """A connection that announces a JSON body of `declared` bytes and sends one."""
    s = socket.create_connection(("127.0.0.1", port_of(server)), timeout=30)
    s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n{" % declared)
    return s


def _err(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    for w in words:
        assert w in response.json()["error"], (w, response.text)


def st_body(header: dict, data: bytes = b"") -> bytes:
    """A safetensors body written by hand (its JSON header as given: escapes a writer would refuse included)."""
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def pixels(n: int, size: int = 8) -> list[np.ndarray]:
    return [np.full((size, size, 3), 23 * i % 256, np.uint8) for i in range(n)]


# -- one hostile client among well-behaved ones -----------------------------------------------------------------

def hostile_requests(server: Server, images: list[str]) -> list[tuple[str, int, object]]:
    """What a hostile client sends: (name, expected status, how to send it). The bad-text requests carry valid
    images, so they would share a batch with the others'."""
    url = server.url + "/v1/score"
    form_end = httpx.Request("POST", url, data={"prompt": "a"}, files=[("image", ("a.png", b"x" * 50))])
    cut_form = (form_end.read()[:-30], {"content-type": form_end.headers["content-type"]})
    return [
        ("lone surrogate", 400, lambda: httpx.post(url, content=json.dumps({"prompt": "\ud800", "images": images}),
                                                   headers=JSON, timeout=60)),
        ("NUL in prompts", 400, lambda: httpx.post(url, json={"prompts": ["ok", "a\0b"], "images": images},
                                                   timeout=60)),
        ("deep JSON", 400, lambda: httpx.post(url, content=b"[" * 100_000 + b"]" * 100_000, headers=JSON)),
        ("two runs named 0", 400, lambda: httpx.post(url, headers=ST, content=save(
            {"images.0": pixels(1)[0][None], "images.00": pixels(1)[0][None]}, metadata={"prompt": "a"}))),
        ("HTTP garbage", 400, lambda: raw(server, b"POST /v1/score HTTP/1.1\r\nContent-Length: -3\r\n\r\n")),
        ("more than the queue", 413, lambda: httpx.post(url, json={"prompt": "a", "images": images[:1] * 11},
                                                        timeout=60)),
        ("truncated form", 400, lambda: httpx.post(url, content=cut_form[0], headers=cut_form[1])),
        ("held body", 408, lambda: read_all(held_body(server))),
    ]


def status_of(answer: object) -> int:
    return answer.status_code if isinstance(answer, httpx.Response) else parsed(answer)[0]  # type: ignore


def test_one_hostile_client_fails_no_other_request(server: Server, scorer: PickScorer, tmp_path: Path) -> None:
    """4 well-behaved clients (4 requests each, all formats) while a hostile one sends bad text with valid images,
    deep JSON, bad keys, HTTP garbage, a request the queue can never hold, a truncated form and a held body: every
    well-behaved request gets 200 and its in-process scores, every hostile one its own 4xx."""
    files = {c: drawn(tmp_path, 2, seed=60 + c) for c in range(4)}
    prompts = {c: [f"client {c} a", f"client {c} b"] for c in range(4)}
    expected = {c: scorer.score(prompts[c], [str(f) for f in files[c]]) for c in range(4)}
    images = as_json("x", files[0])["images"]
    hostile = hostile_requests(server, images)
    done = threading.Event()

    def well_behaved(c: int) -> list[httpx.Response]:
        return [list(POSTS.values())[(c + k) % 3](server.url, prompts[c], files[c]) for k in range(4)]

    def attacker() -> list[tuple[str, int, int]]:
        seen = []
        for _ in range(3):  # bounded: three rounds, or fewer once the others are done
            for name, status, send in hostile:
                seen.append((name, status, status_of(send())))
            if done.is_set():
                break
        return seen

    with ThreadPoolExecutor(6) as pool:
        bad = pool.submit(attacker)
        good = list(pool.map(well_behaved, range(4), timeout=300))
        done.set()
        seen = bad.result(timeout=300)
    for c, answers in enumerate(good):
        for r in answers:
            assert torch.allclose(torch.tensor(scores_of(r)), expected[c], atol=TOL, rtol=RTOL), c
    assert [(n, want) for n, want, got in seen if got != want] == [], seen
    assert server.proc.poll() is None


# -- text, nesting, keys, counts --------------------------------------------------------------------------------

def test_text_that_is_not_text_is_the_requests_own_400(server: Server, tmp_path: Path) -> None:
    url = server.url + "/v1/score"
    images = as_json("x", drawn(tmp_path, 2, seed=70))["images"]
    _err(httpx.post(url, content=json.dumps({"prompt": "caf\udce9", "images": images}), headers=JSON, timeout=60),
         400, "prompt", "lone surrogate", "U+DCE9", "character 3")
    _err(httpx.post(url, json={"prompts": ["fine", "a\0b"], "images": images}, timeout=60), 400, "prompts[1]", "NUL")
    meta = {"__metadata__": {"prompts": json.dumps(["fine", "\ud800"])},
            "images": {"dtype": "U8", "shape": [2, 8, 8, 3], "data_offsets": [0, 384]}}
    _err(httpx.post(url, content=st_body(meta, bytes(384)), headers=ST, timeout=60), 400, "prompts[1]",
         "lone surrogate")
    assert len(scores_of(httpx.post(url, json={"prompt": "café ☕", "images": images}, timeout=60))) == 2


def test_nesting_is_bounded_everywhere_a_body_holds_json(server: Server) -> None:
    url = server.url + "/v1/score"
    deep = "[" * 100_000 + "]" * 100_000
    _err(httpx.post(url, content=deep, headers=JSON), 400, "body", "nested deeper")
    _err(httpx.post(url, content='{"prompt": "a", "images": ' + deep + "}", headers=JSON), 400, "nested deeper")
    _err(httpx.post(url, content=st_body({"a": json.loads("[" * 200 + "]" * 200)}), headers=ST), 400,
         "safetensors", "nested deeper")
    _err(httpx.post(url, headers=ST, content=save({"images": pixels(1)[0][None]}, metadata={"prompts": deep})),
         400, "metadata 'prompts'", "nested deeper")
    assert server.proc.poll() is None


@pytest.mark.parametrize("keys, named", [
    (("images.0", "images.00"), "images.00"),
    (("images.0", "images.²"), "images.²"),
    (("images.0", "images.2"), "images.2"),
    (("images.1",), "images.1"),
    (("images.0", "images.01"), "images.01"),
])
def test_safetensors_runs_need_canonical_indices(server: Server, keys: tuple, named: str) -> None:
    body = save({k: a[None] for k, a in zip(keys, pixels(len(keys)))}, metadata={"prompt": "a"})
    _err(httpx.post(server.url + "/v1/score", content=body, headers=ST), 400, repr(named))


def test_canonical_runs_score_each_image(server: Server) -> None:
    arrays = pixels(3) + pixels(2, size=10)
    runs = {f"images.{i}": a[None] for i, a in enumerate(arrays)}
    body = save(runs, metadata={"prompt": "a"})
    assert len(scores_of(httpx.post(server.url + "/v1/score", content=body, headers=ST, timeout=60))) == 5


def test_more_images_than_the_queue_holds_is_a_413(server: Server) -> None:
    """11 images under --max-images 12 but over --max-queue 10 can never be queued: 413 naming the limit (not a
    503 to retry forever)."""
    body = save({"images": np.stack(pixels(11))}, metadata={"prompt": "a"})
    r = httpx.post(server.url + "/v1/score", content=body, headers=ST, timeout=60)
    _err(r, 413, "11 images", "--max-queue")
    assert "retry-after" not in r.headers


def test_multipart_counts_and_truncation(server: Server) -> None:
    url = server.url + "/v1/score"
    for n in (13, 3000):  # over --max-images 12, by a little and by a lot: the same 413
        files = [("image", (f"{i}.png", b"x", "image/png")) for i in range(n)]
        _err(httpx.post(url, data={"prompt": "a"}, files=files, timeout=60), 413, "--max-images")
    request = httpx.Request("POST", url, data={"prompt": "a"}, files=[("image", ("a.png", b"x" * 200, "image/png"))])
    body = request.read()
    for cut in (len(body) - 10, len(body) // 2):
        _err(httpx.post(url, content=body[:cut], headers={"content-type": request.headers["content-type"]}), 400,
             "truncated")


# -- HTTP level -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("request_bytes", [
    b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"\x00\x01 not HTTP\r\n\r\n",
], ids=["negative", "non-numeric", "duplicate", "te-and-cl", "garbage"])
def test_malformed_http_is_answered_in_json(server: Server, request_bytes: bytes) -> None:
    status, headers, doc = parsed(raw(server, request_bytes))
    assert status == 400 and headers["connection"] == "close" and "malformed HTTP request" in doc["error"]


def test_healthz_says_only_whether_it_is_ready(server: Server) -> None:
    assert httpx.get(server.url + "/healthz", timeout=10).json() == {"status": "ok"}
    info = httpx.get(server.url + "/v1/info", timeout=10).json()
    assert info["model"]["weights"] and info["limits"]["read_timeout_s"] == READ_TIMEOUT_S


def test_docs_need_nothing_from_another_host(server: Server) -> None:
    page = httpx.get(server.url + "/docs", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    text = page.text
    assert "<script" not in text and "http://" not in text and "https://" not in text and "//" not in text
    assert 'href="/openapi.json"' in text and "/v1/score" in text
    assert "/v1/score" in httpx.get(server.url + "/openapi.json", timeout=10).json()["paths"]
    _err(httpx.get(server.url + "/redoc", timeout=10), 404)


# -- time and memory bounds -------------------------------------------------------------------------------------

def test_headers_and_bodies_have_a_deadline(server: Server) -> None:
    """--read-timeout-s: a connection that sends nothing, half its headers, or one byte of its body gets a 408."""
    for data in (b"", b"POST /v1/score HTTP/1.1\r\nHost: x\r\n"):
        status, _, doc = parsed(raw(server, data))
        assert status == 408 and "headers" in doc["error"] and "--read-timeout-s" in doc["error"]
    with held_body(server) as s:
        status, headers, doc = parsed(read_all(s))
    assert status == 408 and "body" in doc["error"] and headers["connection"] == "close"


def test_connections_are_bounded(server: Server, tmp_path: Path) -> None:
    """20 idle connections against --max-connections 16: those past the limit get a 503 at once, the others a 408
    when their time is up; then the server scores as before."""
    socks = [socket.create_connection(("127.0.0.1", port_of(server)), timeout=30) for _ in range(20)]
    try:
        answers = [parsed(read_all(s)) for s in socks]
    finally:
        for s in socks:
            s.close()
    statuses = [status for status, _, _ in answers]
    assert set(statuses) == {503, 408} and statuses.count(503) >= 4, statuses
    refused = next(doc for status, _, doc in answers if status == 503)
    assert "--max-connections" in refused["error"]
    assert len(scores_of(post_json(server.url, "a", drawn(tmp_path, 1, seed=71)))) == 1


def test_bodies_held_at_once_are_bounded(server: Server, tmp_path: Path) -> None:
    """--max-inflight-mb 4: two bodies of 900 KB arriving hold 3.6 MB (each counted twice: it is parsed into a
    copy); a third gets a 503 naming the limit before it is read; once they have ended, requests are served
    again."""
    held = [held_body(server, 900_000) for _ in range(2)]
    try:
        time.sleep(0.5)  # both are reading their bodies now
        third = parsed(raw(server, b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                   b"Content-Length: 900000\r\n\r\n{"))
    finally:
        ended = [parsed(read_all(s))[0] for s in held]
        for s in held:
            s.close()
    status, headers, doc = third
    assert status == 503 and "--max-inflight-mb" in doc["error"] and headers["retry-after"] == "1"
    assert ended == [408, 408]
    assert len(scores_of(post_json(server.url, "a", drawn(tmp_path, 1, seed=72)))) == 1


def test_token_must_be_one_a_client_can_send(model_dir: Path, server: Server) -> None:
    """A token that cannot travel in an HTTP header is refused at start-up (exit 2), and by RemoteScorer."""
    from pickrank.errors import UsageError
    from pickrank.serve.client import RemoteScorer

    env = {k: v for k, v in os.environ.items() if k != "PICKRANK_TOKEN"}
    for args, extra in ((("--token", "tökén"), {}), ((), {"PICKRANK_TOKEN": "two words"})):
        done = subprocess.run(pickrank_cmd("serve", "--model", str(model_dir), *args), capture_output=True,
                              text=True, timeout=60, env={**env, **extra})
        assert done.returncode == 2 and "--token" in done.stderr and "HTTP header" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    with pytest.raises(UsageError, match="token.*U\\+00F6"):
        RemoteScorer(server.url, token="tökén")


def test_sigterm_with_bodies_still_arriving_exits_0(server: Server) -> None:
    """Last: connections that announced a body and sent one byte do not hold the server up. On SIGTERM each gets
    a 503 (the server is stopping) at once, and the server exits 0 and leaves no process."""
    held = [held_body(server) for _ in range(3)]
    time.sleep(0.3)
    server.proc.send_signal(signal.SIGTERM)
    try:
        answers = [parsed(read_all(s)) for s in held]
    finally:
        for s in held:
            s.close()
    assert server.proc.wait(20) == 0, "".join(server.stderr)
    assert [status for status, _, _ in answers] == [503] * 3
    assert all("stopping" in doc["error"] for _, _, doc in answers)
    assert group_gone(server.proc.pid)
    no_traceback("".join(server.stderr))


def test_sigterm_grace_period_bounds_what_is_in_flight(model_dir: Path, tmp_path: Path) -> None:
    """A request waiting in the batcher (--max-wait-ms 20000) past --grace-s 0.5 after SIGTERM gets a 503 saying
    so, and the server exits 0 without waiting for the batch."""
    files = drawn(tmp_path, 1, seed=73)
    with running_server(model_dir, "--max-wait-ms", "20000", "--grace-s", "0.5", workers=0) as s:
        s.wait_ready()
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(post_json, s.url, "a", files)
            time.sleep(1.0)  # in the batcher now, waiting for others
            s.proc.send_signal(signal.SIGTERM)
            _err(pending.result(timeout=60), 503, "stopped before", "--grace-s")
        assert s.proc.wait(20) == 0, "".join(s.stderr)
        no_traceback("".join(s.stderr))


# -- a failed model call is only its own request's -----------------------------------------------------------------

class RefusingText:
    """The real embedder, whose text encoder refuses one prompt (as a tokenizer refuses what it cannot take)."""

    def __init__(self, inner: object, refused: str) -> None:
        self.inner, self.refused = inner, refused

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def embed_texts(self, texts: list[str]) -> object:
        if self.refused in texts:
            raise ValueError(f"cannot encode {self.refused!r}")
        return self.inner.embed_texts(texts)


def test_a_failed_batch_is_scored_request_by_request(scorer: PickScorer, tmp_path: Path) -> None:
    """score_groups (the local and the Ray batcher): when one group's text fails the shared model call, the other
    groups get the scores they get alone and the failing group its own 400."""
    from pickrank.inputs.decode import image_pixels
    from pickrank.serve.batching import score_groups
    from pickrank.serve.requests import ApiError

    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in drawn(tmp_path, 5, seed=74)]
    px = [image_pixels(a, scorer.embedder.spec, None) for a in arrays]
    groups = [(px[:2], ["a cat", "a dog"]), (px[2:3], ["poison"]), (px[3:], ["the sea", "the sea"])]
    results = score_groups(RefusingText(scorer.embedder, "poison"), groups)
    assert isinstance(results[1], ApiError) and results[1].status == 400 and "poison" in results[1].message
    for (group_px, group_prompts), result in zip(groups[::2], results[::2]):
        alone = score_groups(scorer.embedder, [(group_px, group_prompts)])[0]
        assert np.allclose(result[0], alone[0], atol=TOL, rtol=RTOL) and result[1] == alone[1]
