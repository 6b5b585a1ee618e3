"""Image statistics through the engine: from the decode workers, cached beside the embeddings, and an old cache
entry without them embedded again only when a run asks for them."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from pickrank.core.cache import EmbeddingCache
from pickrank.core.engine import Engine
from pickrank.core.scoring import make_engine
from pickrank.errors import UsageError
from pickrank.inputs.decode import decode_and_preprocess
from pickrank.inputs.files import read_bytes
from pickrank.models.torch_embedder import Embedder, resolve_source
from pickrank.options import EngineName, EngineOptions, RunOptions
from pickrank.records import CandidateSet, Query
from tests.support.images import image_paths


@pytest.fixture(scope="module")
def embedder(model_dir):
    return Embedder.load(resolve_source(str(model_dir)), device="cpu")


def _run(embedder, paths, cache, signals: bool, workers: int = 0) -> Engine:
    engine = Engine(embedder, cache, RunOptions(workers=workers, signals=signals))
    for _ in engine.rank([CandidateSet(queries=(Query("a red cat"),), paths=tuple(paths))]):
        pass
    return engine


def test_statistics_come_from_the_workers_and_the_cache(embedder, images, tmp_path):
    paths = image_paths(images)
    cache = EmbeddingCache(tmp_path / "c.sqlite3")
    try:
        plain = _run(embedder, paths, cache, signals=False)
        assert plain.kept is None and plain.summary.embedded == len(paths)
        # entries cached without statistics: embedded again when they are asked for, and only then
        assert _run(embedder, paths, cache, signals=False).summary.cache_hits == len(paths)
        first = _run(embedder, paths, cache, signals=True, workers=1)
        assert first.summary.embedded == len(paths) and first.summary.cache_hits == 0
        again = _run(embedder, paths, cache, signals=True)
        assert again.summary.cache_hits == len(paths) and again.summary.embedded == 0
    finally:
        cache.close()
    for path in paths:
        want = decode_and_preprocess("k", read_bytes(path), embedder.spec, stats=True).stats
        assert first.kept.stats_of(path) == want and again.kept.stats_of(path) == want
        assert np.allclose(first.kept.embedding(path), again.kept.embedding(path))
        assert np.linalg.norm(again.kept.embedding(path)) == pytest.approx(1.0, abs=1e-4)


def test_a_read_only_cache_from_before_the_statistics_is_read_as_it_is(embedder, images, tmp_path):
    paths = image_paths(images)[:2]
    path = tmp_path / "old.sqlite3"
    cache = EmbeddingCache(path)
    _run(embedder, paths, cache, signals=False)
    cache.close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE image_stats")  # as a cache made before the statistics were kept
    db.commit()
    db.close()
    path.chmod(0o444)
    old = EmbeddingCache(path, warn=False)
    try:
        assert old.read_only and old.problem is None
        engine = _run(embedder, paths, old, signals=True)
        assert old.problem is None  # not disabled: its embeddings are still read by runs without statistics
        assert engine.summary.embedded == len(paths) and all(engine.kept.stats_of(p) for p in paths)
        assert _run(embedder, paths, old, signals=False).summary.cache_hits == len(paths)
    finally:
        old.close()


def test_the_ray_engine_refuses_statistics(embedder):
    with pytest.raises(UsageError, match="local engine only"):
        make_engine(embedder, RunOptions(signals=True), engine=EngineOptions(engine=EngineName.ray))


def test_statistics_of_another_definition_are_taken_again(embedder, images, tmp_path):
    paths = image_paths(images)[:2]
    path = tmp_path / "c.sqlite3"
    cache = EmbeddingCache(path)
    try:
        _run(embedder, paths, cache, signals=True)
        cache.close()
        db = sqlite3.connect(path)
        db.execute("UPDATE image_stats SET version = 'older'")  # as statistics of an earlier definition
        db.commit()
        db.close()
        cache = EmbeddingCache(path)
        assert _run(embedder, paths, cache, signals=True).summary.embedded == len(paths)
        assert _run(embedder, paths, cache, signals=True).summary.cache_hits == len(paths)
    finally:
        cache.close()
