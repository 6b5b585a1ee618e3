"""The engine: rankings stream in order, each image reaches the model once, both memo modes agree."""

from __future__ import annotations

import pytest

from pickrank.model import Embedder, resolve_source
from pickrank.pipeline import Engine, RunOptions, single_set
from pickrank.records import CandidateSet, Query

from .conftest import image_paths


@pytest.fixture(scope="module")
def embedder(model_dir):
    return Embedder.load(resolve_source(str(model_dir)), device="cpu")


def test_many_prompts_use_the_embedding_memo_and_agree(embedder, images):
    paths = image_paths(images)
    # 40 prompts > the tiny model's 32 dimensions: the engine keeps embeddings instead of score rows.
    prompts = [f"prompt number {i}" for i in range(40)]
    many = Engine(embedder, options=RunOptions(workers=0)).run(
        [CandidateSet(queries=tuple(Query(p, id=str(i)) for i, p in enumerate(prompts)), paths=paths)])
    many_recs = [r for ranking in many for r in ranking.records]
    few = [r for ranking in Engine(embedder, options=RunOptions(workers=0)).run([single_set(prompts[7], paths)])
           for r in ranking.records]
    got = {r.path: r.score for r in many_recs if r.id == "7"}
    assert got == pytest.approx({r.path: r.score for r in few}, abs=1e-5)
    assert len(many_recs) == 40 * 6


def test_rankings_complete_in_order_and_stream(embedder, images):
    paths = image_paths(images)
    sets = [CandidateSet(queries=(Query("a", group="g1"),), paths=paths[:3]),
            CandidateSet(queries=(Query("b", group="g2"),), paths=paths[3:]),
            CandidateSet(queries=(Query("", group="g3"),), error="no prompt", source="g3")]
    engine = Engine(embedder, options=RunOptions(workers=1, batch_size=2))
    it = engine.run(sets)
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
    recs = [r for ranking in Engine(embedder, options=RunOptions(workers=2, batch_size=4)).run(sets)
            for r in ranking.records]
    assert sum(calls) == 6 and len(recs) == 12
