"""`pickrank.serve.client.RemoteScorer` against a real `pickrank serve` (tiny real CLIP, nothing mocked): the
same inputs and the same scores as the in-process PickScorer, retries, errors, and the README's trainer recipes run
unchanged with either scorer."""

from __future__ import annotations

import asyncio
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
    with running_server(model_dir, "--max-batch", "8", "--max-images", "32", "--token", "tok") as s:
        s.wait_ready()
        yield s


@pytest.fixture(scope="module")
def scorer(model_dir: Path) -> PickScorer:
    return PickScorer.from_pretrained(str(model_dir))


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
