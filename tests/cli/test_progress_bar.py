"""The progress bar as a person sees it (in a pseudo-terminal, through the real CLI), and the engine's progress
events it is drawn from: the total, the final count, cache hits and failures counted, nothing left over the
table."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from pickrank.core.engine import Engine
from pickrank.models.torch_embedder import Embedder, resolve_source
from pickrank.options import RunOptions
from pickrank.records import CandidateSet, Progress, Query
from tests.support.images import draw_image
from tests.support.terminal import run_in_pty, screen

BAR = re.compile(r"pickrank: (embedding|loading the model|discovering|downloading)")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seven images (one a copy of another under a new name) and one broken file."""
    folder = tmp_path_factory.mktemp("bar")
    for i in range(6):
        draw_image(folder / f"img{i}.png", (120 + 10 * i, 100), seed=i)
    shutil.copy(folder / "img0.png", folder / "same_as_img0.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    return folder


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PICKRANK_CACHE": str(tmp_path / "cache.sqlite3"), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "TERM": "xterm"}


def test_the_bar_counts_to_its_total_and_leaves_nothing_on_the_table(folder, model_dir, tmp_path):
    args = ["-m", "pickrank", "score", "-p", "a red cat", str(folder), "--model", str(model_dir), "--workers", "1"]
    code, raw = run_in_pty(args, _env(tmp_path), tmp_path)
    assert code == 3, raw  # the broken file
    # what the bar said while it was up: the total (all 8 files), then the final count with the failure counted
    assert re.search(r"pickrank: embedding  \d/8 images", raw), raw
    assert re.search(r"pickrank: embedding  8/8 images .*100%.*\(1 failed\)", raw), raw
    lines = screen(raw)
    assert not [line for line in lines if BAR.search(line)], lines  # cleared: no bar left anywhere
    title = lines.index("a red cat")  # the table's title stands alone on its line
    assert lines[title + 1].startswith("┏") and "same_as_img0.png" in "\n".join(lines[title:])
    assert lines[-1] == "pickrank: 8 image(s), 6 embedded, 0 from cache, 1 failed, 1 ranking(s)"

    # again, through the cache: the hits are counted on the bar
    code, raw = run_in_pty(args, _env(tmp_path), tmp_path)
    assert re.search(r"pickrank: (embedding|loading the model).*\(6 cached, 1 failed\)", raw), raw


def test_best_of_n_tables_stay_clean(model_dir, tmp_path):
    for g in ("g1", "g2", "g3"):
        for i in range(3):
            draw_image(tmp_path / "out" / g / f"cand{i}.png", (90, 90), seed=10 * i + len(g))
        (tmp_path / "out" / g / "prompt.txt").write_text(f"a castle at dawn over a quiet sea, take {g}")
    code, raw = run_in_pty(["-m", "pickrank", "best-of-n", "out", "--model", str(model_dir), "--top", "2",
                            "--no-cache", "--workers", "0"], _env(tmp_path), tmp_path, cols=60)
    assert code == 0, raw
    lines = screen(raw)
    assert not [line for line in lines if BAR.search(line)], lines
    # each title on lines of its own above its table: wider than 60 columns, it wraps between words only
    starts = [i for i, line in enumerate(lines) if line.startswith("[g")]
    assert len(starts) == 3, lines
    for g, i in zip(("g1", "g2", "g3"), starts):
        end = next(j for j in range(i, len(lines)) if lines[j].startswith("┏"))
        title = f"[{g}] a castle at dawn over a quiet sea, take {g} (prompt from prompt.txt)"
        assert re.sub(r"\s+", " ", " ".join(lines[i:end])) == title
        assert end - i == 2 and all(len(line) <= 60 for line in lines[i:end])


def test_quiet_or_not_a_terminal_draws_nothing(folder, model_dir, runner, tmp_path):
    from pickrank.cli.app import app

    res = runner.invoke(app, ["score", "-p", "x", str(folder / "img1.png"), "--model", str(model_dir)])
    assert res.exit_code == 0 and "\r" not in res.stderr and "embedding" not in res.stderr


def test_engine_events_count_every_image_once(folder, model_dir):
    """The engine's events: done reaches the total of listed images (copies and failures included), with the
    embedded, cached and failed counts of the run's summary."""
    embedder = Embedder.load(resolve_source(str(model_dir)), device="cpu")
    events: list[Progress] = []
    paths = sorted(str(p) for p in folder.iterdir())
    sets = [CandidateSet(queries=(Query("a"),), paths=iter(paths)),
            CandidateSet(queries=(Query("b"),), paths=iter(paths[:3])),  # all met before: resolved from the memo
            CandidateSet(queries=(Query(""),), error="no prompt", source="x")]
    engine = Engine(embedder, options=RunOptions(workers=0), on_progress=events.append, batch_size=3)
    records = [r for ranking in engine.rank(sets) for r in ranking.records]
    last = events[-1]
    assert last.done == last.total == len(paths) + 3 and last.phase == "embedding"
    assert (last.embedded, last.cached, last.failed) == (6, 0, engine.summary.failures)
    assert engine.summary.failures == 1 + 1 + 1  # broken.png in each set, and the set without a prompt
    assert [e.done for e in events] == sorted(e.done for e in events)  # it only counts up
    assert all(e.total in (None, len(paths) + 3) for e in events)
    assert len(records) == len(paths) + 3 + 1


def test_progress_is_reported_between_model_calls(folder, model_dir, monkeypatch):
    """Each batch is counted as soon as it is embedded, not all of them once the last is done (the bar would sit at
    0 for the whole run): at each model call, the events so far already count the batches before it."""
    embedder = Embedder.load(resolve_source(str(model_dir)), device="cpu")
    events: list[Progress] = []
    seen_at_call: list[int] = []
    real = Embedder.embed_images

    def counting(self, pixels):
        seen_at_call.append(events[-1].embedded if events else 0)
        return real(self, pixels)

    monkeypatch.setattr(Embedder, "embed_images", counting)
    paths = [str(folder / f"img{i}.png") for i in range(6)]
    engine = Engine(embedder, options=RunOptions(workers=1), on_progress=events.append, batch_size=2)
    list(engine.rank([CandidateSet(queries=(Query("a"),), paths=paths)]))
    assert seen_at_call == [0, 2, 4]
    assert [e.done for e in events if e.phase == "embedding"][-1] == 6
