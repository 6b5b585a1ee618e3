"""`pickrank serve --engine ray` on a local Ray with one CPU replica (tiny real CLIP, nothing mocked)
returns the local server's scores, through the same HTTP API, and stops on SIGTERM with exit 0. Both servers run
with a preference head (`--head`), so the replica is shown to apply it as the local server and the library do."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
import torch

from pickrank.api import PickScorer
from pickrank.serve.client import RemoteScorer
from tests.support.heads import random_head
from tests.support.server import LIMITS, POSTS, RTOL, TOL, Server, as_json, drawn, post_json, running_server, scores_of

pytest.importorskip("ray.serve")


@pytest.fixture(scope="module")
def head(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_head(model_dir, tmp_path_factory.mktemp("head") / "head.safetensors")


@pytest.fixture(scope="module")
def ray_server(model_dir: Path, head: Path) -> Iterator[Server]:
    """One Ray Serve deployment for the module (Ray's start-up is the slow part)."""
    with running_server(model_dir, "--engine", "ray", "--replicas", "1", "--token", "tok", "--head", str(head),
                        *LIMITS) as s:
        yield s


def test_ray_deployment_scores_as_the_local_server(ray_server: Server, model_dir: Path, head: Path,
                                                   tmp_path: Path) -> None:
    files = drawn(tmp_path, 5, seed=50)
    prompts = ["a red cat", "a blue dog", "a red cat", "the sea", "a red cat"]
    auth = {"authorization": "Bearer tok"}
    assert httpx.post(ray_server.url + "/v1/score", json={"prompt": "a", "images": []}).status_code == 401
    with running_server(model_dir, "--head", str(head), *LIMITS, workers=0) as local:
        local.wait_ready()
        expected = {name: scores_of(post(local.url, prompts, files)) for name, post in POSTS.items()}
    for name, post in POSTS.items():
        got = scores_of(post(ray_server.url, prompts, files, headers=auth))
        assert np.allclose(got, expected[name], atol=TOL, rtol=RTOL), name
    scorer = PickScorer.from_pretrained(str(model_dir), head=str(head))
    batch = torch.rand(12, 3, 48, 40)  # more than --max-batch 8: two @serve.batch calls at least
    with RemoteScorer(ray_server.url, token="tok", deadline=60) as r:
        served = r.score("x", batch)
        assert torch.allclose(served, scorer.score("x", batch), atol=TOL, rtol=RTOL)
        plain = PickScorer.from_pretrained(str(model_dir)).score("x", batch)
        assert not torch.allclose(served, plain, atol=0.1), "the head was not applied"
        with pytest.raises(Exception, match="413"):
            r.score("x", torch.rand(49, 3, 8, 8))
    info = httpx.get(ray_server.url + "/v1/info", headers=auth, timeout=10).json()
    assert info["limits"]["max_batch"] == 8 and info["model"]["device"] == "cpu"
    # one CPU replica gets the cores (its torch their threads), not one thread
    assert info["cpu_threads"] > 1 or os.cpu_count() == 1, info


def test_ray_replica_answers_bad_text_alone(ray_server: Server, tmp_path: Path) -> None:
    """The app's checks hold on Ray too: a prompt that is not text is a 400; the others' requests score."""
    files = drawn(tmp_path, 2, seed=51)
    auth = {"authorization": "Bearer tok"}
    bad = httpx.post(ray_server.url + "/v1/score", headers={**auth, "content-type": "application/json"},
                     content=json.dumps({"prompt": "\ud800", "images": as_json("x", files)["images"]}), timeout=60)
    assert bad.status_code == 400 and "lone surrogate" in bad.json()["error"], bad.text
    assert len(scores_of(post_json(ray_server.url, "fine", files, headers=auth))) == 2


def test_ray_server_stops_on_sigterm(ray_server: Server) -> None:
    ray_server.proc.send_signal(signal.SIGTERM)
    assert ray_server.proc.wait(120) == 0, "".join(ray_server.stderr)
