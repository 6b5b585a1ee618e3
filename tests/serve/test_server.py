"""`pickrank serve`, a real server on a free loopback port (a subprocess of `python -m pickrank serve`
with the tiny real CLIP of conftest.py; nothing mocked), against the in-process PickScorer's scores."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import signal
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
from tests.support.help import assert_shared_options_once
from tests.support.images import draw_image
from tests.support.server import (
    LIMITS,
    POSTS,
    RTOL,
    TOL,
    Server,
    as_json,
    drawn,
    group_gone,
    png_bytes,
    post_form,
    post_json,
    post_st,
    running_server,
    safetensors_body,
    scores_of,
)

# -- a real server --------------------------------------------------------------------------------------------







@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[Server]:
    with running_server(model_dir, *LIMITS) as s:
        s.wait_ready()
        yield s


# -- requests in the three formats ----------------------------------------------------------------------------



















# -- scores ---------------------------------------------------------------------------------------------------

def test_three_formats_give_the_in_process_scores(server: Server, scorer: PickScorer, tmp_path: Path) -> None:
    files = drawn(tmp_path, 5)
    prompts = ["a red cat", "a blue dog", "a red cat", "the sea", "a red cat"]
    expected = scorer.score(prompts, [str(f) for f in files])
    got = {name: scores_of(post(server.url, prompts, files)) for name, post in POSTS.items()}
    for name, scores in got.items():
        assert torch.allclose(torch.tensor(scores), expected, atol=TOL, rtol=RTOL), name
    assert got["json"] == got["multipart"] == got["safetensors"]
    body = post_json(server.url, prompts, files).json()
    assert body["scale"] == "raw" and body["truncated"] == [False] * 5
    assert body["model"].startswith(f"{scorer.embedder.source.model}@")  # a short id; ?meta=1 for the provenance


def test_scales_per_request(server: Server, scorer: PickScorer, tmp_path: Path) -> None:
    files = drawn(tmp_path, 2, seed=3)
    raw = scorer.score("a cat", [str(f) for f in files])
    for scale, divisor in (("raw", 1.0), ("unit26", 26.0), ("cosine", scorer.scale)):
        body = post_json(server.url, "a cat", files, scale=scale).json()
        assert body["scale"] == scale
        assert np.allclose(body["scores"], (raw / divisor).numpy(), atol=TOL, rtol=RTOL), scale
    st = httpx.post(server.url + "/v1/score", headers={"content-type": "application/octet-stream"},
                    content=safetensors_body("a cat", [np.asarray(Image.open(f).convert("RGB")) for f in files],
                                             scale="unit26"), timeout=60).json()
    assert st["scale"] == "unit26" and np.allclose(st["scores"], (raw / 26).numpy(), atol=TOL, rtol=RTOL)


def test_concurrent_clients_get_their_own_scores_and_batching_changes_none(server: Server, scorer: PickScorer,
                                                                          tmp_path: Path) -> None:
    """12 clients at once, each with its own images (all formats): each gets the in-process scores of its own
    images, as when each image is sent alone; requests were merged into model calls."""
    clients = [drawn(tmp_path, 3, seed=10 + c) for c in range(12)]
    prompts = [[f"client {c} image {i}" for i in range(3)] for c in range(12)]
    alone = {(c, i): scores_of(post_json(server.url, prompts[c][i], [f]))[0]
             for c, files in enumerate(clients[:3]) for i, f in enumerate(files)}
    before = _metric(server, "pickrank_batch_size_count")

    def one(c: int) -> list[float]:
        return scores_of(list(POSTS.values())[c % 3](server.url, prompts[c], clients[c]))

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(one, range(12), timeout=120))
    for c, files in enumerate(clients):
        expected = scorer.score(prompts[c], [str(f) for f in files])
        assert torch.allclose(torch.tensor(got[c]), expected, atol=TOL, rtol=RTOL), c
    for (c, i), score in alone.items():
        assert abs(got[c][i] - score) <= TOL + RTOL * abs(score)
    calls = _metric(server, "pickrank_batch_size_count") - before
    assert calls < 12, f"{calls} model calls for 12 concurrent requests: nothing was batched"


def _metric(server: Server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


def test_a_request_larger_than_max_batch_is_split(server: Server, scorer: PickScorer, tmp_path: Path) -> None:
    files = drawn(tmp_path, 20, seed=7)  # --max-batch 8: three model calls
    expected = scorer.score("many", [str(f) for f in files])
    assert torch.allclose(torch.tensor(scores_of(post_st(server.url, "many", files))), expected, atol=TOL, rtol=RTOL)


def test_rank_best_first_with_prob(server: Server, scorer: PickScorer, tmp_path: Path) -> None:
    files = drawn(tmp_path, 4, seed=5)
    expected = scorer.score("a cat", [str(f) for f in files])
    body = post_form(server.url, "a cat", files, path="/v1/rank").json()
    ranking = body["ranking"]
    assert [r["index"] for r in ranking] == torch.argsort(expected, descending=True).tolist()
    assert [r["rank"] for r in ranking] == [1, 2, 3, 4]
    assert abs(sum(r["prob"] for r in ranking) - 1) < 1e-5
    assert np.allclose([r["score"] for r in ranking], expected.sort(descending=True).values, atol=TOL, rtol=RTOL)
    two = post_json(server.url, ["a", "b", "a", "a"], files, path="/v1/rank")
    assert two.status_code == 400 and "one prompt" in two.json()["error"]


def test_info_and_responses_carry_the_provenance(server: Server, model_dir: Path, tmp_path: Path) -> None:
    weights = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    info = httpx.get(server.url + "/v1/info", timeout=10).json()["model"]
    assert info["weights"] == {"model.safetensors": weights} and info["backend"] == "torch"
    assert info["model"] == os.path.abspath(model_dir) and info["scale"] == "raw"
    assert info["versions"]["pickrank"] and info["preprocessing"]["decode"] == "exact"
    files = drawn(tmp_path, 2)
    body = httpx.post(server.url + "/v1/score?meta=1", json=as_json("a red cat", files, scale="unit26"),
                      timeout=60).json()
    # with ?meta=1, the same provenance, in the unit this response's scores are in
    assert body["model"] == {**info, "scale": "unit26"} and body["scale"] == "unit26"
    # without it, the model's short id: its folder and its weights' hash
    short = post_json(server.url, "a red cat", files)
    assert short.json()["model"] == f"{os.path.abspath(model_dir)}@{weights[:12]}"
    assert len(short.content) < 200  # two scores: no provenance in every answer
    rank = httpx.post(server.url + "/v1/rank", json=as_json("a red cat", files), timeout=60).json()
    assert rank["model"] == short.json()["model"]


def test_info_metrics_docs(server: Server) -> None:
    info = httpx.get(server.url + "/v1/info", timeout=10).json()
    assert info["limits"]["max_batch"] == 8 and info["limits"]["max_images"] == 48
    assert info["scale"] == "raw" and info["model"]["device"] == "cpu" and info["versions"]["torch"]
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in ("pickrank_requests_total", "pickrank_images_total", "pickrank_batch_size_bucket",
                 "pickrank_queue_images", "pickrank_request_seconds_bucket"):
        assert name in text, name
    assert httpx.get(server.url + "/docs", timeout=10).status_code == 200
    assert "/v1/score" in httpx.get(server.url + "/openapi.json", timeout=10).json()["paths"]


# -- errors ---------------------------------------------------------------------------------------------------

def _err(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    message = response.json()["error"]
    for w in words:
        assert w in message, (w, message)


def test_every_error_class_and_the_server_goes_on(server: Server, tmp_path: Path) -> None:
    url = server.url + "/v1/score"
    files = drawn(tmp_path, 3, seed=9)
    good = as_json("a cat", files)
    st = {"content-type": "application/x-safetensors"}
    # 400: malformed bodies, naming the field and index
    _err(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON")
    _err(httpx.post(url, json={**good, "images": good["images"][:1] + ["@@@"]}), 400, "images[1]", "base64")
    _err(httpx.post(url, json={**good, "images": [good["images"][0], 7]}), 400, "images[1]")
    _err(httpx.post(url, json={"prompts": ["a", "b"], "images": good["images"]}), 400, "prompts", "2 prompts")
    _err(httpx.post(url, json={"prompts": ["a", 3, "c"], "images": good["images"]}), 400, "prompts[1]")
    _err(httpx.post(url, json={"images": good["images"]}), 400, "prompt")
    _err(httpx.post(url, json={**good, "promt": "x"}), 400, "promt")
    _err(httpx.post(url, json={**good, "scale": "log"}), 400, "scale", "unit26")
    _err(httpx.post(url, content=b"\x00" * 12, headers=st), 400, "safetensors")
    _err(httpx.post(url, headers=st, content=save({"images": np.zeros((1, 8, 8, 3), np.float32)},
                                                  metadata={"prompt": "a"})), 400, "images", "uint8")
    _err(httpx.post(url, headers=st, content=save({"pixels": np.zeros((1, 8, 8, 3), np.uint8)},
                                                  metadata={"prompt": "a"})), 400, "pixels")
    _err(httpx.post(url, headers=st, content=save({"images": np.zeros((8, 8, 3), np.uint8)},
                                                  metadata={"prompt": "a"})), 400, "(N, H, W, 3)")
    _err(httpx.post(url, files=[("prompt", (None, "a")), ("image", (None, "not a file"))]), 400, "image[0]", "file")
    _err(httpx.post(url, content=b"x", headers={"content-type": "text/plain"}), 415, "text/plain")
    # 413: body, images, pixels (encoded and as pixels)
    _err(httpx.post(url, content=b"{" + b" " * (1 << 20) + b"}", headers={"content-type": "application/json"}),
         413, "--max-body-mb")
    _err(httpx.post(url, json={"prompt": "a", "images": good["images"][:1] * 49}), 413, "49 images", "--max-images")
    big = draw_image(tmp_path / "big.png", (400, 300), seed=1)  # 120,000 pixels > --max-pixels 100000
    _err(post_json(server.url, "a", [files[0], big]), 413, "images[1]", "pixels")
    _err(post_st(server.url, "a", [files[0], big]), 413, "images[1]", "pixels")
    # 422: an image that does not decode, by index
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(png_bytes(files[1])[:200])
    _err(post_json(server.url, "a", [files[0], truncated]), 422, "images[1]")
    _err(httpx.post(url, json={"prompt": "a", "images": [good["images"][0],
                                                         base64.b64encode(b"GIF89a nothing").decode()]}),
         422, "images[1]")
    # 413: more images than the queue could ever hold (--max-queue 40): not a 503 to retry
    _err(httpx.post(url, json={"prompt": "a", "images": good["images"][:1] * 41}, timeout=60), 413, "--max-queue")
    # 404 and 405 are JSON too
    _err(httpx.get(server.url + "/nothing"), 404)
    _err(httpx.get(url), 405)
    # ...and the server still scores
    assert len(scores_of(httpx.post(url, json=good, timeout=60))) == 3
    assert server.proc.poll() is None


# -- start-up, auth, shutdown ---------------------------------------------------------------------------------

def test_token_healthz_503_while_loading(model_dir: Path, scorer: PickScorer, tmp_path: Path) -> None:
    """/healthz and requests answer 503 with Retry-After before the model has loaded; with PICKRANK_TOKEN set a
    request without the token, or with another, gets 401; /healthz needs none."""
    files = drawn(tmp_path, 2, seed=21)
    auth = {"authorization": "Bearer s3cret"}
    with running_server(model_dir, env={"PICKRANK_TOKEN": "s3cret"}, workers=0) as s:
        first = httpx.get(s.url + "/healthz", timeout=10)
        early = httpx.post(s.url + "/v1/score", json=as_json("a", files), headers=auth, timeout=10)
        assert first.status_code == 503 and first.headers["retry-after"] == "1", first.text
        _err(early, 503, "loading")
        s.wait_ready()
        _err(httpx.post(s.url + "/v1/score", json=as_json("a", files), timeout=10), 401, "bearer token")
        _err(httpx.post(s.url + "/v1/score", json=as_json("a", files), timeout=10,
                        headers={"authorization": "Bearer s3cres"}), 401, "wrong token")
        _err(httpx.get(s.url + "/metrics", timeout=10), 401)
        ok = httpx.post(s.url + "/v1/score", json=as_json("a", files), headers=auth, timeout=60)
        expected = scorer.score("a", [str(f) for f in files])
        assert torch.allclose(torch.tensor(scores_of(ok)), expected, atol=TOL, rtol=RTOL)


@pytest.mark.parametrize("args, words", [
    (("--host", "0.0.0.0"), ("--token", "--insecure-no-auth")),
    (("--host", "::", "--port", "0"), ("--token",)),
    (("--token", "t", "--insecure-no-auth"), ("not both",)),
    (("--replicas", "2"), ("--engine ray",)),
])
def test_exposure_needs_a_token(model_dir: Path, args: tuple, words: tuple) -> None:
    done = subprocess.run(pickrank_cmd("serve", "--model", str(model_dir), *args), capture_output=True, text=True,
                          timeout=60, env={k: v for k, v in os.environ.items() if k != "PICKRANK_TOKEN"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("pickrank: error: ") and len(done.stderr.strip().splitlines()) == 1
    for w in words:
        assert w in done.stderr


@pytest.mark.timing
def test_sigterm_finishes_what_is_in_flight(model_dir: Path, scorer: PickScorer, tmp_path: Path) -> None:
    """A request waiting in the batcher (--max-wait-ms 3000) when SIGTERM comes is answered correctly; the server
    exits 0 and leaves no process (decode workers included)."""
    files = drawn(tmp_path, 2, seed=31)
    with running_server(model_dir, "--max-wait-ms", "3000") as s:
        s.wait_ready()
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(post_st, s.url, "a cat", files)
            time.sleep(1.0)  # the request is in the batcher now, waiting for others
            s.proc.send_signal(signal.SIGTERM)
            response = pending.result(timeout=60)
        assert s.proc.wait(30) == 0, "".join(s.stderr)
        expected = scorer.score("a cat", [str(f) for f in files])
        assert torch.allclose(torch.tensor(scores_of(response)), expected, atol=TOL, rtol=RTOL)
        assert group_gone(s.proc.pid)
        no_traceback("".join(s.stderr))


@pytest.mark.timing
def test_sigterm_during_load_loses_no_accepted_request(model_dir: Path, scorer: PickScorer,
                                                       tmp_path: Path) -> None:
    """Clients send from the moment the server listens; SIGTERM comes while the model loads. Every request that got
    an answer got 503 (loading) or its correct scores; the server exits 0 and leaves no process."""
    files = drawn(tmp_path, 2, seed=41)
    expected = scorer.score("a cat", [str(f) for f in files])
    answers: list[httpx.Response] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                answers.append(post_json(s.url, "a cat", files))
            except httpx.TransportError:  # refused once the server has stopped listening
                time.sleep(0.05)

    with running_server(model_dir) as s:
        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        s.proc.send_signal(signal.SIGTERM)
        try:
            assert s.proc.wait(60) == 0, "".join(s.stderr)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert group_gone(s.proc.pid)
    assert answers, "no request was answered before the shutdown"
    for r in answers:
        assert r.status_code in (200, 503), r.text
        if r.status_code == 200:
            assert torch.allclose(torch.tensor(r.json()["scores"]), expected, atol=TOL, rtol=RTOL)
    no_traceback("".join(s.stderr))


def test_a_model_that_fails_to_load_stops_the_server(tmp_path: Path, model_dir: Path) -> None:
    """Weights that do not load: the server says why in one line and exits 1 (it does not serve 500s forever)."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes()[:4096])
    with running_server(broken, workers=0) as s:
        assert s.proc.wait(90) == 1
        time.sleep(0.2)
        err = "".join(s.stderr)
    assert "pickrank: error:" in err
    no_traceback(err)


def test_serve_help_lists_each_shared_option_once(runner, monkeypatch) -> None:
    """serve takes the model options, --workers, --max-pixels, --engine, --ray-address, -q and --debug from the
    one table, and declares only its own."""
    from pickrank.cli.app import app
    from pickrank.cli.serve import serve
    from pickrank.cli.shared import SHARED
    
    takes = [n for n in SHARED if n in ("model", "processor", "revision", "offline", "device", "dtype", "alpha",
                                        "backend", "decode", "batch_size", "head", "workers", "quiet", "max_pixels",
                                        "debug", "engine", "scale", "ray_address")]
    assert_shared_options_once(runner, monkeypatch, ("serve",), serve, takes)
    text = runner.invoke(app, ["serve", "--help"]).stdout
    assert "$ pickrank serve" in text and "--insecure-no-auth" in text


def test_without_the_serve_extra_a_one_line_hint(model_dir: Path, tmp_path: Path) -> None:
    """fastapi missing (a module of that name that cannot be imported shadows it): exit 2 naming the extra."""
    (tmp_path / "fastapi.py").write_text("raise ImportError('No module named fastapi')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(pickrank_cmd("serve", "--model", str(model_dir)), capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 2 and "pip install 'pickrank[serve]'" in done.stderr, done.stderr
    no_traceback(done.stderr)


def test_no_signals_unless_asked(server, tmp_path):
    response = post_json(server.url, "a red cat", drawn(tmp_path, 2, seed=5))
    assert set(response.json()) == {"scores", "truncated", "scale", "model"}
    assert "pickrank_image_" not in httpx.get(server.url + "/metrics", timeout=30).text
