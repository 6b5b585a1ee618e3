"""`pickrank.serve.client.RemoteScorer` against a real `pickrank serve` (tiny real CLIP, nothing mocked): the
same inputs and the same scores as the in-process PickScorer, retries, errors, and the README's trainer recipes run
unchanged with either scorer."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from pickrank.api import PickScorer
from pickrank.errors import RemoteError, UsageError
from pickrank.serve.client import RemoteScorer
from tests.support.commands import pickrank_cmd
from tests.support.images import draw_image
from tests.support.server import RTOL, TOL, Server, running_server


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[Server]:
    with running_server(model_dir, "--max-batch", "8", "--max-images", "32", "--max-queue", "16",
                        "--token", "tok") as s:
        s.wait_ready()
        yield s


@pytest.fixture
def remote(server: Server) -> Iterator[RemoteScorer]:
    with RemoteScorer(server.url, token="tok", deadline=60) as r:
        yield r


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype == torch.float32 and a.shape == b.shape and torch.allclose(a, b, atol=TOL, rtol=RTOL)


def every_kind(tmp_path: Path) -> list[Any]:
    """One image of every kind PickScorer.score takes, of several sizes and modes (transparency included)."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (50, 60, 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, 60, dtype=np.uint8)
    palette = Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)).convert("P")
    palette.info["transparency"] = 0
    return [
        str(draw_image(tmp_path / "a.png", (120, 90), seed=1)),                # a path
        draw_image(tmp_path / "b.jpg", (64, 64), seed=2),                      # a Path
        Image.open(draw_image(tmp_path / "c.webp", (90, 120), seed=3)),        # PIL RGB
        Image.fromarray(rgba),                                                 # PIL RGBA
        palette,                                                               # PIL P with transparency
        Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8)).convert("LA"),
        rng.integers(0, 256, (70, 50, 3), dtype=np.uint8),                     # uint8 HWC numpy
        rgba,                                                                  # uint8 HWC numpy with alpha
        rng.integers(0, 256, (80, 80), dtype=np.uint8),                        # grey numpy
        torch.randint(0, 256, (3, 45, 66), dtype=torch.uint8),                 # uint8 CHW tensor
        torch.rand(3, 100, 75),                                                # float CHW tensor in [0, 1]
        torch.rand(1, 50, 50),                                                 # float grey tensor
    ]


def test_every_input_kind_scores_as_in_process(remote: RemoteScorer, scorer: PickScorer, tmp_path: Path) -> None:
    images = every_kind(tmp_path)
    prompts = [f"prompt {i % 4}" for i in range(len(images))]
    assert close(remote.score(prompts, images), scorer.score(prompts, images))
    assert close(remote.score("one prompt", images), scorer.score("one prompt", images))


def test_float_batches_quantised_as_in_process(remote: RemoteScorer, scorer: PickScorer) -> None:
    batch = torch.rand(10, 3, 64, 48)  # one tensor: one safetensors key; 10 > --max-batch 8: split server-side
    assert close(remote.score("x", batch), scorer.score("x", batch))
    assert close(asyncio.run(remote.ascore("x", batch)), scorer.score("x", batch))
    assert remote.score("x", []).shape == (0,)


def test_rank_and_scale(server: Server, scorer: PickScorer, tmp_path: Path) -> None:
    images = every_kind(tmp_path)[:5]
    raw = scorer.score("a cat", images)
    with RemoteScorer(server.url, token="tok", scale="unit26") as r26:
        assert torch.allclose(r26.score("a cat", images), raw / 26, atol=TOL, rtol=RTOL)
        ranking = r26.rank("a cat", images)
    assert [x["index"] for x in ranking] == torch.argsort(raw, descending=True).tolist()
    with RemoteScorer(server.url, token="tok", scale="cosine") as rc:
        assert torch.allclose(rc.score("a cat", images), raw / scorer.scale, atol=1e-6, rtol=RTOL)
    with pytest.raises(UsageError, match="scale"):
        RemoteScorer(server.url, scale="log")


def test_client_errors_raise_with_status_and_message(server: Server, tmp_path: Path) -> None:
    images = [np.zeros((8, 8, 3), np.uint8)] * 33  # --max-images 32
    with RemoteScorer(server.url, token="tok", deadline=5) as r:
        with pytest.raises(RemoteError) as e:
            r.score("x", images)
        assert e.value.status == 413 and "--max-images" in e.value.server_message
        with pytest.raises(UsageError, match="2 prompts for 3 images"):
            r.score(["a", "b"], images[:3])
    with RemoteScorer(server.url, token="wrong", deadline=5) as bad, pytest.raises(RemoteError) as e:
        bad.score("x", images[:1])
    assert e.value.status == 401 and "HTTP 401" in str(e.value)
    with RemoteScorer(server.url, deadline=5) as none, pytest.raises(RemoteError) as e:
        none.score("x", images[:1])
    assert e.value.status == 401


def test_deadline_on_an_unreachable_server() -> None:
    port = _free_port()
    started = time.monotonic()
    with RemoteScorer(f"http://127.0.0.1:{port}", deadline=1.0) as r, pytest.raises(RemoteError) as e:
        r.score("x", [np.zeros((8, 8, 3), np.uint8)])
    assert time.monotonic() - started < 5 and e.value.status is None and "cannot reach" in str(e.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_retries_until_the_server_is_up_and_loaded(model_dir: Path, scorer: PickScorer) -> None:
    """A call made before the server starts retries the refused connections, then the 503s while it loads, and
    returns the scores."""
    port = _free_port()
    images = torch.rand(3, 3, 40, 40)
    result: list[Any] = []
    r = RemoteScorer(f"http://127.0.0.1:{port}", deadline=90)
    t = threading.Thread(target=lambda: result.append(r.score("late", images)))
    t.start()
    time.sleep(1.0)
    proc = subprocess.Popen(pickrank_cmd("serve", "--model", str(model_dir), "--port", str(port), "--workers", "0"),
                            stderr=subprocess.DEVNULL)
    try:
        t.join(120)
        assert result and close(result[0], scorer.score("late", images))
    finally:
        r.close()
        proc.terminate()
        assert proc.wait(30) == 0


# -- the README's trainer recipes, run with both scorers ------------------------------------------------------

def pickscore_reward_fn(scorer: Any) -> Any:
    """flow_grpo-style: reward_fn(images, prompts, metadata) -> (scores, info); PickScore / 26 as flow_grpo does
    (the README's recipe)."""

    def reward_fn(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> tuple[Any, dict]:
        scores = scorer.score(prompts, images, scale="unit26")
        return scores.tolist(), {}

    return reward_fn


def reward_loop(scorer: Any, batches: list[tuple[list[str], torch.Tensor]]) -> list[torch.Tensor]:
    """The plain loop: rewards = scorer.score(prompts, images) for each sampled batch."""
    out = []
    for prompts, images in batches:
        rewards = scorer.score(prompts, images)
        out.append(rewards)
    return out


def test_recipes_run_unchanged_with_both_scorers(remote: RemoteScorer, scorer: PickScorer) -> None:
    images = torch.rand(4, 3, 64, 64)  # what a diffusion sampler hands a reward function: floats in [0, 1]
    prompts = ["a cat", "a dog", "a cat", "a fox"]
    local, far = pickscore_reward_fn(scorer), pickscore_reward_fn(remote)
    (ls, linfo), (rs, rinfo) = local(images, prompts, [{}] * 4), far(images, prompts, [{}] * 4)
    assert linfo == rinfo == {} and np.allclose(ls, rs, atol=TOL, rtol=RTOL)
    assert np.allclose(ls, (scorer.score(prompts, images) / 26).tolist(), atol=1e-6)
    batches = [(prompts, images), (prompts[:2], torch.rand(2, 3, 32, 48))]
    for a, b in zip(reward_loop(scorer, batches), reward_loop(remote, batches)):
        assert close(a, b)


@pytest.mark.timing
def test_a_request_that_times_out_is_not_sent_again(model_dir: Path) -> None:
    """The server holds the request in its batcher (--max-wait-ms 3000) past the client's timeout: RemoteError at
    once, and the server saw one request, not a retry storm."""
    with running_server(model_dir, "--max-wait-ms", "3000", workers=0) as s:
        s.wait_ready()
        with RemoteScorer(s.url, timeout=0.5, deadline=30) as r, pytest.raises(RemoteError, match="no answer"):
            r.score("x", [np.zeros((8, 8, 3), np.uint8)])
        time.sleep(3.5)
        import httpx

        metrics = httpx.get(s.url + "/metrics", timeout=10).text
        assert 'pickrank_requests_total{endpoint="score",status="200"} 1.0' in metrics, metrics


# -- answers the client must not trust --------------------------------------------------------------------------

class TamperingProxy:
    """A loopback HTTP proxy in front of the real server that rewrites its answers with `tamper(status, body)`
    (as a broken proxy, a server of another version or a hostile one would)."""

    def __init__(self, upstream: str) -> None:
        import http.server

        proxy = self
        self.tamper: Any = lambda status, body: (status, body)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                import httpx

                body = self.rfile.read(int(self.headers["content-length"]))
                answer = httpx.post(upstream + self.path, content=body, timeout=60,
                                    headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                status, out = proxy.tamper(answer.status_code, answer.content)
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _rewrite(field: str, value: Any) -> Any:
    """A tamper that sets one field of a 200 answer (the JSON re-encoded as Python writes it: NaN included)."""
    import json

    def tamper(status: int, body: bytes) -> tuple[int, bytes]:
        doc = json.loads(body)
        doc[field] = value(doc[field]) if callable(value) else value
        return status, json.dumps(doc).encode()

    return tamper


@pytest.mark.parametrize("tamper, words", [
    (lambda s, b: (s, b"<html>busy</html>"), "not JSON"),
    (lambda s, b: (s, b"[1, 2, 3]"), "not an object"),
    (lambda s, b: (s, b"[" * 50_000 + b"]" * 50_000), "nested deeper"),
    (_rewrite("scores", lambda v: v[:1]), "1 scores for 3 images"),
    (_rewrite("scores", lambda v: [v[0], float("nan"), v[2]]), "scores[1]"),
    (_rewrite("scores", lambda v: [v[0], v[1], float("inf")]), "scores[2]"),
    (_rewrite("scores", lambda v: [v[0], str(v[1]), v[2]]), "scores[1]"),
    (_rewrite("scores", lambda v: [True, v[1], v[2]]), "scores[0]"),
    (_rewrite("scores", {"a": 1}), "not a list"),
    (lambda s, b: (s, b'{"score": [1, 2, 3]}'), "'scores'"),
    (lambda s, b: (400, b"[1]"), "HTTP 400"),
    (lambda s, b: (500, b"Internal Server Error"), "HTTP 500"),
])
def test_every_answer_is_checked(server: Server, tamper: Any, words: str) -> None:
    """An answer that is not what the server sends (not JSON, another shape, fewer scores than images, NaN,
    Infinity, strings, booleans) is a RemoteError naming what is wrong, never a KeyError or a NaN reward."""
    proxy = TamperingProxy(server.url)
    proxy.tamper = tamper
    images = [np.full((8, 8, 3), 60 * i, np.uint8) for i in range(3)]
    try:
        with RemoteScorer(proxy.url, token="tok", deadline=5) as r, pytest.raises(RemoteError) as e:
            r.score("x", images)
        assert words in str(e.value), str(e.value)
        with RemoteScorer(proxy.url, token="tok", deadline=5) as r, pytest.raises(RemoteError) as e:
            asyncio.run(r.ascore("x", images))
        assert words in str(e.value), str(e.value)
    finally:
        proxy.close()


@pytest.mark.parametrize("ranking, words", [
    (lambda v: v[:1], "list of 2"),
    (lambda v: [v[0], v[0]], "each of the 2 images once"),
    (lambda v: [{**v[0], "prob": float("nan")}, v[1]], "ranking[0]"),
    (lambda v: [v[0], {k: x for k, x in v[1].items() if k != "rank"}], "ranking[1]"),
])
def test_every_ranking_is_checked(server: Server, ranking: Any, words: str) -> None:
    proxy = TamperingProxy(server.url)
    proxy.tamper = _rewrite("ranking", ranking)
    try:
        with RemoteScorer(proxy.url, token="tok", deadline=5) as r, pytest.raises(RemoteError, match=re.escape(words)):
            r.rank("x", [np.zeros((8, 8, 3), np.uint8), np.ones((8, 8, 3), np.uint8)])
    finally:
        proxy.close()


def test_more_images_than_the_queue_holds_fail_at_once(server: Server) -> None:
    """20 images under --max-images 32 but over --max-queue 16: a RemoteError 413 on the first answer, not
    retries until the deadline (the server saw the request once)."""
    import httpx

    def refused() -> float:
        text = httpx.get(server.url + "/metrics", headers={"authorization": "Bearer tok"}, timeout=10).text
        line = 'pickrank_requests_total{endpoint="score",status="413"} '
        return next((float(x[len(line):]) for x in text.splitlines() if x.startswith(line)), 0.0)

    before = refused()
    with RemoteScorer(server.url, token="tok", deadline=30) as r, pytest.raises(RemoteError) as e:
        r.score("x", [np.zeros((8, 8, 3), np.uint8)] * 20)
    assert e.value.status == 413 and "--max-queue" in e.value.server_message
    assert refused() == before + 1


def test_prompts_that_are_not_text_are_refused_before_sending(server: Server) -> None:
    from pickrank.errors import InvalidText

    with RemoteScorer(server.url, token="tok", deadline=5) as r:
        for prompts in ("caf\udce9", ["ok", "a\0b"]):
            with pytest.raises(InvalidText):
                r.score(prompts, [np.zeros((8, 8, 3), np.uint8)] * 2)
