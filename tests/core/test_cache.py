"""The persistent embedding cache: hits, misses, fingerprints, resume after a kill, concurrency, corruption."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pickrank.cli.app import app
from pickrank.core.cache import EmbeddingCache, default_cache_path
from pickrank.devtools import build_model
from pickrank.models.torch_embedder import PickScoreTowers
from tests.support.commands import invoke, jsonl
from tests.support.images import draw_image


def scores(res) -> dict[str, float]:
    return {r["path"]: r["score"] for r in jsonl(res.stdout)}


@pytest.fixture
def cache_file(tmp_path):
    return tmp_path / "c" / "emb.sqlite3"


def run(runner, model_dir, cache_file, images, prompt="a red cat", *extra):
    res = runner.invoke(app, ["score", "-p", prompt, "--model", str(model_dir), "--cache", str(cache_file),
                              *extra, str(images)])
    assert res.exit_code == 0, res.output
    return res


def test_default_path_follows_env(monkeypatch, tmp_path):
    monkeypatch.delenv("PICKRANK_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_path() == tmp_path / "pickrank" / "embeddings.sqlite3"
    monkeypatch.setenv("PICKRANK_CACHE", str(tmp_path / "x.db"))
    assert default_cache_path() == tmp_path / "x.db"


def test_second_run_hits_and_scores_equal_uncached(runner, model_dir, images, cache_file, count_embeds):
    first = run(runner, model_dir, cache_file, images)
    assert sum(count_embeds) == 6
    second = run(runner, model_dir, cache_file, images, "a blue dog on the moon")
    assert sum(count_embeds) == 6  # nothing new reached the model
    assert "0 embedded, 6 from cache" in second.stderr
    uncached = run(runner, model_dir, cache_file, images, "a blue dog on the moon", "--no-cache")
    # Within float32 rounding (batching and thread counts move the last bits: test_cache_hardening.py, item 15)
    assert scores(second) == pytest.approx(scores(uncached), abs=1e-5, rel=0)
    assert scores(first) == pytest.approx(scores(run(runner, model_dir, cache_file, images, "a red cat",
                                                     "--no-cache")), abs=1e-5, rel=0)


def test_all_hits_load_only_the_text_tower(runner, model_dir, images, cache_file, monkeypatch):
    run(runner, model_dir, cache_file, images)
    loaded: list[str] = []
    real = PickScoreTowers._load

    def recording(self, tower):
        loaded.append(tower)
        return real(self, tower)

    monkeypatch.setattr(PickScoreTowers, "_load", recording)
    run(runner, model_dir, cache_file, images, "another prompt")
    assert loaded == ["text"]
    draw_image(images / "new.png", (90, 90), seed=99)
    run(runner, model_dir, cache_file, images, "another prompt")
    assert loaded == ["text", "text", "vision"]  # a miss loads the vision tower


def test_no_cache_neither_reads_nor_writes(runner, model_dir, images, cache_file, count_embeds):
    run(runner, model_dir, cache_file, images, "x", "--no-cache")
    assert not cache_file.exists()
    run(runner, model_dir, cache_file, images, "x", "--no-cache")
    assert sum(count_embeds) == 12


def test_edited_image_misses(runner, model_dir, images, cache_file, count_embeds):
    run(runner, model_dir, cache_file, images)
    draw_image(images / "img0.jpg", (300, 200), seed=1234)  # same name, new content
    res = run(runner, model_dir, cache_file, images)
    assert count_embeds == [6, 1]
    assert "1 embedded, 5 from cache" in res.stderr


def test_fingerprint_dtype_and_model_folder(runner, model_dir, images, cache_file, count_embeds, tmp_path):
    from pickrank.models.torch_embedder import cpu_has_bf16

    run(runner, model_dir, cache_file, images)
    other = tmp_path / "other-model"
    shutil.copytree(model_dir, other)  # same weights, another folder: another fingerprint
    run(runner, other, cache_file, images)
    assert count_embeds == [6, 6]
    retrained = build_model(tmp_path / "retrained", seed=1)
    run(runner, retrained, cache_file, images)
    assert count_embeds == [6, 6, 6]
    if cpu_has_bf16():
        run(runner, model_dir, cache_file, images, "a red cat", "--dtype", "bf16")
        assert count_embeds == [6, 6, 6, 6]
    info = EmbeddingCache(cache_file).info()
    assert len(info.models) == (4 if cpu_has_bf16() else 3) and info.entries == 6 * len(info.models)


def pickrank_cmd(model_dir, cache_file, *args) -> list[str]:
    """`python -m pickrank score` with this model and cache (in process: the arguments after `-m pickrank`)."""
    return [sys.executable, "-m", "pickrank", "score", "--model", str(model_dir), "--cache", str(cache_file), *args]


def test_killed_run_resumes_from_finished_batches(model_dir, tmp_path, cache_file):
    folder = tmp_path / "many"
    for i in range(40):
        draw_image(folder / f"{i:03d}.png", (200, 150), seed=1000 + i)
    proc = subprocess.Popen(pickrank_cmd(model_dir, cache_file, "-p", "x", "--batch-size", "2", "--workers", "0",
                                         str(folder)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline:
        time.sleep(0.2)
        if cache_file.exists():
            try:
                done = EmbeddingCache(cache_file).info().entries
            except Exception:
                done = 0
            if done >= 4:
                break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = EmbeddingCache(cache_file).info().entries
    assert 4 <= kept < 40 or kept == 40  # whole batches survived the kill
    res = invoke(*pickrank_cmd(model_dir, cache_file, "-p", "x", str(folder))[3:])
    assert res.returncode == 0, res.stderr
    assert f"{40 - kept} embedded, {kept} from cache" in res.stderr
    ref = invoke(*pickrank_cmd(model_dir, cache_file, "-p", "x", "--no-cache", str(folder))[3:])
    resumed, fresh = ({r["path"]: r["score"] for r in jsonl(p.stdout)} for p in (res, ref))
    assert resumed.keys() == fresh.keys()
    # batch sizes differed between the runs: the same up to float rounding of batched matmuls
    assert all(abs(resumed[k] - fresh[k]) < 1e-4 for k in fresh)


def test_two_processes_share_a_cache(model_dir, tmp_path, cache_file):
    folder = tmp_path / "shared"
    for i in range(16):
        draw_image(folder / f"{i:02d}.png", (120, 100), seed=2000 + i)
    cmd = pickrank_cmd(model_dir, cache_file, "-p", "x", "--batch-size", "2", "--workers", "0", str(folder))
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    ref = invoke(*pickrank_cmd(model_dir, cache_file, "-p", "x", "--no-cache", str(folder))[3:])
    expected = {r["path"]: r["score"] for r in jsonl(ref.stdout)}
    for out, err in outs:
        got = {r["path"]: r["score"] for r in jsonl(out)}
        assert got.keys() == expected.keys()
        assert all(abs(got[k] - expected[k]) < 1e-4 for k in expected)  # batches differ: float rounding only
        assert "disabled" not in err
    assert EmbeddingCache(cache_file).info().entries == 16


def test_corrupt_cache_is_moved_aside_and_the_run_continues(runner, model_dir, images, cache_file):
    run(runner, model_dir, cache_file, images)
    data = bytearray(cache_file.read_bytes())
    data[100:] = b"\xab" * (len(data) - 100)  # pickrank's own cache (its header kept), its pages destroyed
    cache_file.write_bytes(bytes(data))
    res = run(runner, model_dir, cache_file, images)
    assert "moved aside" in res.stderr
    assert any(p.name.startswith("emb.sqlite3.corrupt-") for p in cache_file.parent.iterdir())
    assert scores(res) == scores(run(runner, model_dir, cache_file, images, "a red cat", "--no-cache"))
    assert EmbeddingCache(cache_file).info().entries == 6  # a fresh cache was started and filled


def test_unwritable_cache_location_never_fails_a_run(runner, model_dir, images, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    res = run(runner, model_dir, blocker / "sub" / "emb.sqlite3", images)
    assert "cache" in res.stderr and len(jsonl(res.stdout)) == 6


def test_cache_commands(runner, model_dir, images, cache_file):
    run(runner, model_dir, cache_file, images)
    res = runner.invoke(app, ["cache", "info", "--cache", str(cache_file)])
    assert res.exit_code == 0
    assert str(cache_file) in res.stdout and "entries: 6" in res.stdout and str(model_dir) in res.stdout
    res = runner.invoke(app, ["cache", "prune", "--older-than", "1", "--cache", str(cache_file)])
    assert res.stdout.strip() == "deleted 0 entries"
    res = runner.invoke(app, ["cache", "prune", "--older-than", "0", "--cache", str(cache_file)])
    assert res.stdout.strip() == "deleted 6 entries"
    run(runner, model_dir, cache_file, images)
    res = runner.invoke(app, ["cache", "clear", "--model", "no-such-model", "--cache", str(cache_file)])
    assert res.stdout.strip() == "deleted 0 entries"
    res = runner.invoke(app, ["cache", "clear", "--model", str(model_dir), "--cache", str(cache_file)])
    assert res.stdout.strip() == "deleted 6 entries"


def test_cache_roundtrip_is_exact(tmp_path):
    c = EmbeddingCache(tmp_path / "x.db")
    vec = np.random.default_rng(0).standard_normal(1024).astype(np.float32)
    c.put_many({"k": vec}, "m")
    assert np.array_equal(c.get_many(["k", "other"], "m")["k"], vec)
    assert c.get_many(["k"], "another-model") == {}
