"""The one way candidate sets are scored: the engine chosen (this process, or Ray), winners copied, rankings handed
to sinks with the run's provenance.

`rankings` is the entry point that `PickScorer.rank`, the scoring commands and compare all go through;
`score_into` adds what a command run needs around it (the model load, the cache, the provenance, the sinks), and
`score_job` the outputs of the score, best-of-n and batch commands.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Protocol, Sequence

from pickrank.core.cache import NullCache, open_cache
from pickrank.core.engine import Engine, Ranking
from pickrank.core.provenance import for_run
from pickrank.errors import UsageError
from pickrank.models import loading
from pickrank.options import CacheOptions, EngineName, EngineOptions, ModelOptions, OutputOptions, RunOptions
from pickrank.output.copies import check_copy_to, copy_winners
from pickrank.output.guards import check_outputs, guard_inputs
from pickrank.output.sinks import MetaHandOver, Sink, write_ranking
from pickrank.output.targets import Output
from pickrank.output.writers import MetaWriter, choose_format, make_writer, record_fields
from pickrank.records import CandidateSet, Progress, RunSummary

if TYPE_CHECKING:
    from pickrank.models.protocol import ImageTextEmbedder

log = logging.getLogger("pickrank")


@dataclass(frozen=True)
class ScoringOptions:
    """The option bundles of a scoring run (the CLI builds them from its flags, the library from its arguments)."""

    model: ModelOptions = field(default_factory=ModelOptions)
    run: RunOptions = field(default_factory=RunOptions)
    cache: CacheOptions = field(default_factory=CacheOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    engine: EngineOptions = field(default_factory=EngineOptions)


class RankingEngine(Protocol):
    """What scores candidate sets: `core.engine.Engine`, or `ray.engine.RayEngine`."""

    summary: RunSummary

    def rank(self, sets: Iterable[CandidateSet]) -> Iterator[Ranking]:
        """Each set's Ranking, in order, as soon as it completes."""

    def rank_open(self, sets: Iterable[CandidateSet]) -> Iterator[Ranking]:
        """`rank` for an open-ended stream of sets whose prompts are not known up front (a dataset)."""


@dataclass(frozen=True)
class Scored:
    """What a scoring run did: its counts, and how many images failed (reading, decoding or copying)."""

    summary: RunSummary
    failed: int


def make_engine(embedder: ImageTextEmbedder, run: RunOptions, *, cache: NullCache | None = None,
                engine: EngineOptions | None = None, batch_size: int | None = None,
                on_progress: Callable[[Progress], None] | None = None) -> RankingEngine:
    """The local engine, or the Ray one with `engine ray`; both yield the same Rankings."""
    if engine is not None and engine.engine is EngineName.ray:
        from pickrank.ray.engine import RayEngine

        if embedder.backend != "torch":  # Ray's actors load the torch model
            raise UsageError("--engine ray runs the torch backend only; an ONNX export runs with --engine local")
        return RayEngine(embedder, cache, run, on_progress=on_progress, address=engine.ray_address,
                         actors=engine.ray_actors, batch_size=batch_size)
    return Engine(embedder, cache, run, on_progress=on_progress, batch_size=batch_size)


def rankings(engine: RankingEngine, sets: Iterable[CandidateSet], copy_to: str | None = None,
             stream: bool = False) -> Iterator[Ranking]:
    """The engine's rankings (stream: of an open-ended stream of sets, `rank_open`); with copy_to, each scored image
    copied there (a failed copy is that record's error, counted in the ranking's `failed`)."""
    for ranking in (engine.rank_open(sets) if stream else engine.rank(sets)):
        if copy_to:
            records, not_copied = copy_winners(ranking.records, copy_to)
            ranking = replace(ranking, records=records, failed=ranking.failed + not_copied)
        yield ranking


def score_into(sinks: Sequence[Sink], sets: Iterable[CandidateSet], options: ScoringOptions, *,
               copy_to: str | None = None, on_progress: Callable[[Progress], None] | None = None,
               on_loaded: Callable[[ImageTextEmbedder], None] | None = None, stream: bool = False) -> Scored:
    """Load the model, score the sets through the cache, hand each ranking to every sink (the provenance first, to
    those that want it); what was done (also said on the "pickrank" logger). `on_progress` hears where the run
    stands (a first download, the load, images done of the total) and "writing" before each ranking is written.
    stream: the sets are an open-ended stream (a dataset's), taken one at a time (`Engine.rank_open`)."""
    if options.engine.engine is EngineName.ray:
        from pickrank.ray.cluster import require_ray

        require_ray()  # without the extra: a one-line usage error before the (slow) model load
    embedder = loading.load_embedder(options.model, on_loaded=on_loaded, on_progress=on_progress)
    meta = MetaHandOver(sinks, embedder, lambda: for_run(embedder, options.run.scale, options.cache.cache))
    cache = open_cache(options.cache.cache, enabled=not options.cache.no_cache)
    engine = make_engine(embedder, options.run, cache=cache, engine=options.engine,
                         batch_size=options.model.batch_size, on_progress=on_progress)
    failed = 0
    try:
        for ranking in rankings(engine, sets, copy_to, stream):
            meta.give()  # once, before the first records: -f json --with-meta writes the provenance first
            failed += ranking.failed
            if on_progress is not None:
                on_progress(Progress("writing"))
            for sink in sinks:
                write_ranking(sink, ranking.records)
        embedder.result()  # a run that never needed the model still reports a model that failed to load
        meta.give()
    except BaseException:
        meta.give_if_loaded()  # an interrupted run's page and --meta still say what ran
        raise
    finally:
        cache.close()
    s = engine.summary
    log.info("%d image(s), %d embedded, %d from cache, %d failed, %d ranking(s)", s.images, s.embedded,
             s.cache_hits, s.failures, s.rankings)
    return Scored(s, failed)


@dataclass(frozen=True)
class ScoringJob:
    """What the score, best-of-n and batch commands hand over: the sets, and what their outputs must respect."""

    kind: str  # score, best-of-n or batch: the record columns
    sets: list[CandidateSet]
    inputs: tuple[str, ...] = ()  # named on the command line (files, folders, a CSV): no output may overwrite them
    copy_to: str | None = None


def open_outputs(kind: str, out: OutputOptions, inputs: Sequence[str], copy_to: str | None,
                 sinks: list[Sink]) -> dict[tuple[int, int], str]:
    """Check the outputs (before the model loads) and open them into `sinks` one by one (so that the caller can
    close or discard each whatever happens); returns the output files that `guard_inputs` watches for."""
    files = check_outputs([("-o", out.output), ("--html", out.html), ("--meta", out.meta)], inputs)
    fmt = choose_format(out)
    if fmt == "parquet":
        from pickrank.output.parquet import check_parquet_output

        check_parquet_output(out.output)
    target = Output(out.output, binary=fmt == "parquet")
    sinks.append(make_writer(fmt or ("table" if target.is_terminal else "jsonl"), target,
                             record_fields(kind, copy=copy_to is not None), null=out.null, with_meta=out.with_meta))
    if out.meta:
        sinks.append(MetaWriter(Output(out.meta, label="--meta")))
    if out.html:
        from pickrank.report.gallery import HtmlReport

        sinks.append(HtmlReport(out.html, kind=kind))
    if copy_to:
        check_copy_to(copy_to)
    return files


def score_job(job: ScoringJob, options: ScoringOptions, sinks: list[Sink], *,
              on_progress: Callable[[Progress], None] | None = None,
              on_loaded: Callable[[ImageTextEmbedder], None] | None = None) -> Scored:
    """A scoring command's run: its outputs opened into `sinks`, then `score_into` them."""
    files = open_outputs(job.kind, options.output, job.inputs, job.copy_to, sinks)
    return score_into(sinks, guard_inputs(job.sets, files), options, copy_to=job.copy_to, on_progress=on_progress,
                      on_loaded=on_loaded)
