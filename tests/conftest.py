"""Shared fixtures: a small real CLIP model (random weights, fixed seed) built once per session, and images."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
from pathlib import Path
from typing import Iterator

# Before torch loads (OpenMP reads it once): the test processes' idle torch threads sleep instead of spinning on
# the two cores that the other pytest-xdist worker and the CLI subprocesses need (the CLI sets the same).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from pickrank import PickScorer  # noqa: E402
from pickrank.devtools import build_model  # noqa: E402
from tests.support.commands import pickrank_cmd  # noqa: E402
from tests.support.images import draw_image  # noqa: E402
from tests.support.pairs import PROMPTS as PAIR_PROMPTS  # noqa: E402
from tests.support.shared import built_once, run_folder  # noqa: E402

if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)  # one core per worker: the in-process tiny models need no more

# A test suite started in the background of a non-interactive shell (`make test &`, nohup) inherits SIGINT
# ignored, and so would every pickrank it starts: the Ctrl-C tests would see no Ctrl-C. Python's own handler here
# makes the children start with the default disposition, as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cpu_load: the test loads every core on purpose; no timing test runs beside "
                            "it (pytest-xdist runs its module first)")
    config.addinivalue_line("markers", "timing: a test with a time limit, or whose signals must come at the right "
                            "moment: never run beside a cpu_load test (it waits for it to end)")



@pytest.fixture(autouse=True)
def _timing_apart_from_cpu_load(request: pytest.FixtureRequest,
                                tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A cpu_load test holds the run's CPU-load lock exclusively, a timing test holds it shared: with pytest-xdist
    they never overlap (a timing test waits for the load to end, and the load for the timing tests running)."""
    exclusive = request.node.get_closest_marker("cpu_load") is not None
    if not exclusive and request.node.get_closest_marker("timing") is None:
        yield
        return
    with open(run_folder(tmp_path_factory) / "cpu-load.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)  # released when the file closes
        yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With pytest-xdist (--dist loadscope --no-loadscope-reorder: each module on one worker, in this order): the
    modules with a cpu_load test first, so that the timing tests of the modules that come last do not wait for it."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return

    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    loads = {module(item) for item in items if item.get_closest_marker("cpu_load")}
    timed = {module(item) for item in items if item.get_closest_marker("timing")} - loads
    items.sort(key=lambda item: 0 if module(item) in loads else 2 if module(item) in timed else 1)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own cache file and no network; nothing touches ~/.cache."""
    monkeypatch.setenv("PICKRANK_CACHE", str(tmp_path_factory.mktemp("cache") / "emb.sqlite3"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PICKRANK_MODEL", raising=False)




def _build_tiny_clip(path: Path) -> None:
    path.mkdir(parents=True)
    build_model(path, seed=0)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIPModel with the real code path: tokenizer, LAION preprocessor config, safetensors."""
    return built_once(tmp_path_factory, "tiny-clip", _build_tiny_clip)




@pytest.fixture(scope="session")
def export_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported to ONNX once per test run, through the real command (this checkout's code)."""

    def export(out: Path) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        r = subprocess.run(pickrank_cmd("export", "onnx", str(out), "--model", str(model_dir)), capture_output=True,
                           text=True, env=env, timeout=180)
        assert r.returncode == 0, r.stderr

    return built_once(tmp_path_factory, "tiny-onnx", export)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A folder of six images of odd sizes and formats, one in a subfolder."""
    folder = tmp_path / "imgs"
    sizes = [(300, 200), (201, 333), (224, 224), (97, 1203), (640, 480)]
    for i, size in enumerate(sizes):
        draw_image(folder / f"img{i}.{'png' if i % 2 else 'jpg'}", size, seed=i)
    draw_image(folder / "sub" / "deep.webp", (150, 170), seed=42)
    return folder


@pytest.fixture
def count_embeds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A thin counting wrapper around the real Embedder.embed_images: how many images reached the model."""
    from pickrank.models.torch_embedder import Embedder

    calls: list[int] = []
    real = Embedder.embed_images

    def counting(self, pixels):
        calls.append(len(pixels))
        return real(self, pixels)

    monkeypatch.setattr(Embedder, "embed_images", counting)
    return calls


@pytest.fixture
def runner():
    from typer.testing import CliRunner

    return CliRunner()






os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def pairs_data(model_dir, tmp_path_factory):
    """Six pairs over nine distinct images (three images appear twice), with the tiny model's scores."""
    folder = tmp_path_factory.mktemp("evaldata")
    imgs = [draw_image(folder / "img" / f"i{i}.{'png' if i % 2 else 'jpg'}", (160 + 13 * i, 120 + 7 * i), seed=i)
            for i in range(9)]
    idx = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 0), (1, 2)]
    rows = []
    scorer = PickScorer.from_pretrained(str(model_dir), device="cpu")
    for k, (a, b) in enumerate(idx):
        prompt = PAIR_PROMPTS[k % len(PAIR_PROMPTS)]
        s = scorer.score(prompt, [str(imgs[a]), str(imgs[b])]).tolist()
        rows.append({"prompt": prompt, "image_0": f"img/{imgs[a].name}", "image_1": f"img/{imgs[b].name}",
                     "scores": s, "best": 0.0 if s[0] > s[1] else 1.0,
                     "bytes": (imgs[a].read_bytes(), imgs[b].read_bytes())})
    assert len({r["best"] for r in rows}) == 2  # both sides win somewhere
    return folder, rows
