"""The engine: rankings stream in order, each image reaches the model once, both memo modes agree."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from pickrank.core.backend import LocalBackend
from pickrank.core.engine import Engine
from pickrank.inputs.files import content_key, read_bytes
from pickrank.inputs.sets import sets_for_score
from pickrank.models.loading import LoadingEmbedder, load_in_background
from pickrank.models.source import inspect_model
from pickrank.models.torch_embedder import Embedder, resolve_source
from pickrank.options import RunOptions
from pickrank.records import CandidateSet, Query
from tests.support.images import image_paths


@pytest.fixture(scope="module")
def embedder(model_dir):
    return Embedder.load(resolve_source(str(model_dir)), device="cpu")


def test_many_prompts_use_the_embedding_memo_and_agree(embedder, images):
    paths = image_paths(images)
    # 40 prompts > the tiny model's 32 dimensions: the engine keeps embeddings instead of score rows.
    prompts = [f"prompt number {i}" for i in range(40)]
    many = Engine(embedder, options=RunOptions(workers=0)).rank(
        [CandidateSet(queries=tuple(Query(p, id=str(i)) for i, p in enumerate(prompts)), paths=paths)])
    many_recs = [r for ranking in many for r in ranking.records]
    few = [r for ranking in Engine(embedder, options=RunOptions(workers=0)).rank(sets_for_score(prompts[7], paths))
           for r in ranking.records]
    got = {r.path: r.score for r in many_recs if r.id == "7"}
    # 40 prompts in one text batch against one: another GEMM shape, equal within the fp32 bound of the project
    assert got == pytest.approx({r.path: r.score for r in few}, abs=1e-4)
    assert len(many_recs) == 40 * 6


def test_rankings_complete_in_order_and_stream(embedder, images):
    paths = image_paths(images)
    sets = [CandidateSet(queries=(Query("a", group="g1"),), paths=paths[:3]),
            CandidateSet(queries=(Query("b", group="g2"),), paths=paths[3:]),
            CandidateSet(queries=(Query("", group="g3"),), error="no prompt", source="g3")]
    engine = Engine(embedder, options=RunOptions(workers=1), batch_size=2)
    it = engine.rank(sets)
    first = next(it)  # the first group is yielded before the rest are consumed
    assert {r.group for r in first.records} == {"g1"}
    rest = list(it)
    assert [r.records[0].group for r in rest] == ["g2", "g3"]
    assert rest[1].records[0].error == "no prompt"
    assert engine.summary.embedded == 6 and engine.summary.rankings == 2


def test_each_distinct_image_reaches_the_model_once_across_sets(embedder, images, monkeypatch):
    calls: list[int] = []
    real = Embedder.embed_images
    monkeypatch.setattr(Embedder, "embed_images", lambda self, px: (calls.append(len(px)), real(self, px))[1])
    paths = image_paths(images)
    sets = [CandidateSet(queries=(Query("a"),), paths=paths), CandidateSet(queries=(Query("b"),), paths=paths[::-1])]
    recs = [r for ranking in Engine(embedder, options=RunOptions(workers=2), batch_size=4).rank(sets)
            for r in ranking.records]
    assert sum(calls) == 6 and len(recs) == 12


def _loading(embedder: Embedder) -> tuple[LoadingEmbedder, Future]:
    """The embedder as the CLI hands it over: still loading until the test resolves the future."""
    fut: Future = Future()
    return LoadingEmbedder(inspect_model(embedder.source), fut), fut


def _drain(backend: LocalBackend) -> list:
    """Everything a finished backend hands back, poll by poll (a model call's worth each)."""
    out = []
    while got := backend.poll(block=True):
        assert len([f for f in got if f.keys]) <= 1  # one model call per poll: progress moves batch by batch
        out += got
    return out


def _submit_all(backend: LocalBackend, paths: list[str]) -> list[str]:
    keys = []
    for p in paths:
        data = read_bytes(p)
        keys.append(content_key(data))
        backend.submit(keys[-1], data)
    return keys


def test_decoded_images_wait_for_a_loading_model_then_are_embedded_once(embedder, images, count_embeds,
                                                                        monkeypatch):
    loading, fut = _loading(embedder)
    paths = image_paths(images)
    monkeypatch.setattr(LocalBackend, "LOADING_WINDOW", 5)  # 6 images: the window fills while loading
    for workers, window in ((1, 8), (0, 4)):  # 8 per worker; inline: 2 x batch
        small = LocalBackend(loading, RunOptions(workers=workers), batch_size=2)
        assert small.decoder.window == window
        small.close()
    monkeypatch.setattr(LocalBackend, "LOADING_WINDOW", 12)
    loader = LocalBackend(loading, RunOptions(workers=1), batch_size=2)
    assert loader.decoder.window == 12
    backend = LocalBackend(loading, RunOptions(workers=0), batch_size=2)
    late = threading.Timer(10, fut.set_result, args=(embedder,))  # a backend that waits fails, it does not hang
    late.start()
    keys = _submit_all(backend, paths)
    assert backend.poll(block=True) == [] and count_embeds == []  # decoded and held, nothing embedded yet
    assert not fut.done()
    assert len(backend.batcher) >= 2 and backend.batcher.nbytes == sum(d.pixels.nbytes for d in backend.batcher.items)
    late.cancel()
    if not fut.done():
        fut.set_result(embedder)
    assert loader.model_ready() and loader.decoder.window == 8  # the running size once the model is there
    loader.close()
    backend.finish()
    done = _drain(backend)
    backend.close()
    got = {k: e for f in done for k, e in zip(f.keys, f.embeddings)}
    assert sorted(got) == sorted(keys) and count_embeds == [2, 2, 2]
    ready = LocalBackend(embedder, RunOptions(workers=0), batch_size=2)  # the same batches, model loaded
    _submit_all(ready, paths)
    ready.finish()
    ref = {k: e for f in _drain(ready) for k, e in zip(f.keys, f.embeddings)}
    ready.close()
    assert all((got[k] == ref[k]).all() for k in keys)


def test_held_images_are_bounded_the_backend_waits_for_the_model_past_the_limit(embedder, images, monkeypatch):
    loading, fut = _loading(embedder)
    monkeypatch.setattr(LocalBackend, "HOLD_BYTES", 1)  # one decoded image is already past the limit
    monkeypatch.setattr(LocalBackend, "LOADING_WINDOW", 0)
    backend = LocalBackend(loading, RunOptions(workers=0), batch_size=2)
    threading.Timer(0.2, fut.set_result, args=(embedder,)).start()
    _submit_all(backend, image_paths(images))
    done = backend.poll(block=True)  # waits for the model instead of holding more
    backend.close()
    assert fut.done() and done and all(len(f.keys) == 2 for f in done)
    assert len(backend.batcher) < 2


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_started_while_the_model_loads_equals_a_run_with_it_loaded(model_dir, embedder, images, workers):
    paths = image_paths(images)
    sets = [CandidateSet(queries=(Query("a red cat"), Query("the sea")), paths=paths)]
    loaded = [r for k in Engine(embedder, options=RunOptions(workers=workers)).rank(sets) for r in k.records]
    loading = load_in_background(resolve_source(str(model_dir)), device="cpu")
    engine = Engine(loading, options=RunOptions(workers=workers))
    background = [r for k in engine.rank(sets) for r in k.records]
    assert background == loaded and engine.summary.embedded == 6


@pytest.mark.parametrize("workers,during", [(1, 1), (0, 2)])
def test_a_tiny_model_runs_on_one_thread_beside_decode_workers(embedder, images, monkeypatch, workers, during):
    import torch

    seen: list[int] = []
    real = Embedder.embed_images
    monkeypatch.setattr(Embedder, "embed_images",
                        lambda self, px: (seen.append(torch.get_num_threads()), real(self, px))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert embedder.image_gflops < LocalBackend.SMALL_MODEL_GFLOPS
        backend = LocalBackend(embedder, RunOptions(workers=workers), batch_size=4)
        _submit_all(backend, image_paths(images))
        backend.finish()
        backend.poll(block=True)
        backend.close()
        assert seen and set(seen) == {during}  # without decode workers nothing competes for the cores
        assert torch.get_num_threads() == 2  # given back when the run ends
    finally:
        torch.set_num_threads(before)


def test_image_gflops_of_pickscore_architecture():
    from types import SimpleNamespace

    from pickrank.devtools import PICKSCORE_ARCH

    vision = SimpleNamespace(num_channels=3, **PICKSCORE_ARCH["vision"])
    fake = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(vision_config=vision)))
    # ViT-H/14 at 224: ~167 GMACs per image, as published for the architecture.
    assert Embedder.image_gflops.fget(fake) == pytest.approx(2 * 167, rel=0.01)


def test_files_in_flight_are_bounded_by_bytes_while_the_model_loads(embedder, images, monkeypatch):
    loading, fut = _loading(embedder)
    paths = image_paths(images)
    sizes = [len(read_bytes(p)) for p in paths]
    monkeypatch.setattr(LocalBackend, "LOADING_BYTES", sizes[0] + sizes[1])  # two files' worth
    backend = LocalBackend(loading, RunOptions(workers=1), batch_size=2)
    try:
        assert backend.decoder.window == LocalBackend.LOADING_WINDOW and not backend.full
        _submit_all(backend, paths[:2])
        assert backend.full and backend.decoder.bytes == sizes[0] + sizes[1]  # the byte limit, not the window
        backend.poll(block=True)
        assert not backend.full and backend.decoder.bytes == sizes[1]
        fut.set_result(embedder)
        assert backend.model_ready() and backend.decoder.max_bytes is None
    finally:
        backend.close()


def test_streams_of_small_sets_take_bytes_and_keep_bounded_memos(embedder, images):
    """eval's way through the engine: images as bytes in memory, chunk by chunk, memos bounded; the scores are those
    of the same images as files."""
    from pickrank.records import ImageBytes

    paths = image_paths(images)
    ref = {r.path: r.score for k in Engine(embedder, options=RunOptions(workers=0)).rank(sets_for_score("a", paths))
           for r in k.records}
    engine = Engine(embedder, options=RunOptions(workers=0), memo_size=2, warn=False)
    pairs = [(paths[i], paths[(i + 1) % 6]) for i in range(6)]
    chunks = [[CandidateSet(queries=(Query("a"),), paths=(ImageBytes("x", read_bytes(a)), b)) for a, b in pairs[j:j + 2]]
              for j in range(0, 6, 2)]
    got = [r for k in engine.rank_stream(chunks) for r in k.records]
    assert len(got) == 12 and {r.path for r in got} == {"x", *paths}
    for (a, b), i in zip(pairs, range(0, 12, 2)):
        recs = {r.path: r.score for r in got[i:i + 2]}
        assert recs["x"] == pytest.approx(ref[a], abs=1e-4) and recs[b] == pytest.approx(ref[b], abs=1e-4)
    n_prompts, n_images = engine.remembered()
    assert n_images <= 2 and n_prompts == 1
