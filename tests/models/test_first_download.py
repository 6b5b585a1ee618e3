"""A first run downloads the weights visibly (what, how far, where to), and the library leaves huggingface_hub's and
transformers' settings as it found them.

The hub is out of reach here, so a small HTTP server on 127.0.0.1 plays it (`HF_ENDPOINT`,
`pickrank.devtools.LocalHub`): it answers huggingface_hub's HEAD and GET requests for
`/<repo>/resolve/<revision>/<file>` with the tiny test model's files, as the hub does for a model without Xet
storage. What this cannot show: a real 4 GB transfer's timing, the hub's
redirects to its CDN, and Xet-backed downloads (they report through the same tqdm class).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from pickrank.devtools import HUB_COMMIT as COMMIT
from pickrank.devtools import LocalHub
from tests.support.terminal import run_in_pty

REPO = "someone/pickscore-tiny"


@pytest.fixture
def hub(model_dir: Path) -> Iterator[tuple[str, list[str]]]:
    """(endpoint, the requests it got): every repo id is the tiny model."""
    with LocalHub(model_dir) as local:
        yield local.url, local.asked


def _env(tmp_path: Path, endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return {**env, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "PICKRANK_CACHE": str(tmp_path / "cache.sqlite3"), "TOKENIZERS_PARALLELISM": "false", "TERM": "xterm"}


def test_the_cli_shows_the_first_download_and_not_the_next(hub, model_dir, images, tmp_path):
    endpoint, asked = hub
    args = ["-m", "pickrank", "score", "-p", "a red cat", str(images), "--model", REPO, "--workers", "0"]
    code, raw = run_in_pty(args, _env(tmp_path, endpoint), tmp_path)
    assert code == 0, raw
    cache = str(tmp_path / "hf" / "hub")
    assert f"pickrank: downloading the weights of {REPO} into {cache}" in raw
    size = os.path.getsize(model_dir / "model.safetensors") / 1e3
    assert f"pickrank: downloading model.safetensors  0 B/{size:.1f} kB [............]   0%" in raw, raw
    assert any(a.startswith("GET /someone/pickscore-tiny/resolve/main/model.safetensors") for a in asked)
    assert (tmp_path / "hf" / "hub" / "models--someone--pickscore-tiny" / "snapshots" / COMMIT
            / "model.safetensors").is_file()
    code, raw = run_in_pty(args, _env(tmp_path, endpoint), tmp_path)
    assert code == 0 and "downloading" not in raw  # a cached copy is used as it is


LIBRARY = """\
import importlib, logging, torch
from transformers.utils import logging as hf_logging
hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")
from pickrank import PickScorer

def state():
    return (dict(hub_tqdm.progress_bar_states), hf_logging.is_progress_bar_enabled(),
            logging.getLogger("transformers").level, logging.getLogger("huggingface_hub").level,
            torch.get_num_threads(), logging.getLogger().handlers[:])

before = state()
scorer = PickScorer.from_pretrained({repo!r}, device="cpu")
scorer.score("a red cat", [{image!r}])  # the vision tower loads here
scorer.rank("a red cat", [{image!r}])
print("unchanged" if state() == before else f"changed: {{before}} -> {{state()}}")
"""


def test_the_library_shows_the_hub_bar_and_leaves_global_state_alone(hub, images, tmp_path):
    endpoint, _ = hub
    script = tmp_path / "load.py"
    script.write_text(LIBRARY.format(repo=REPO, image=str(images / "img0.jpg")))
    code, raw = run_in_pty([str(script)], _env(tmp_path, endpoint), tmp_path)
    assert code == 0, raw
    assert "unchanged" in raw, raw
    # huggingface_hub's own bar, left on: the file, its size, and the end of the transfer
    assert "model.safetensors: 100%" in raw and "/s]" in raw, raw


def test_from_pretrained_changes_no_global_state_in_process(model_dir, images):
    """The same, in this process: the transformers load report and bars are off only while a tower loads."""
    import importlib

    import torch
    from transformers.utils import logging as hf_logging

    from pickrank import PickScorer

    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")
    hub_tqdm.progress_bar_states["some.group"] = False  # a host's own setting, kept as it is

    def state() -> tuple:
        return (dict(hub_tqdm.progress_bar_states), hf_logging.is_progress_bar_enabled(),
                logging.getLogger("transformers").level, torch.get_num_threads())

    try:
        before = state()
        scorer = PickScorer.from_pretrained(str(model_dir), device="cpu")
        scorer.score("a red cat", [str(images / "img0.jpg")])
        assert state() == before
    finally:
        hub_tqdm.progress_bar_states.pop("some.group", None)


def test_without_a_network_the_advice_downloads_only_what_pickrank_reads(images, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: connecting is refused, as without a network
    env = {**_env(tmp_path, f"http://127.0.0.1:{port}"), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, "-m", "pickrank", "score", "-p", "a red cat", "--no-cache", str(images)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "(hf download yuvalkirstain/PickScore_v1 --include config.json model.safetensors)" in res.stderr
