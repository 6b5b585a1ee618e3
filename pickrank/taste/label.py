"""`pickrank label`: SOURCE's candidates -> a local page that asks for pairwise preferences -> labels.jsonl.

The page is up at once, asking random pairs; with the default order the current scorer (PickScore, or PickScore +
--head) scores the candidates in a background thread, through the embedding cache, prompt by prompt, and the pairs
it is least sure about come next (one in four stays random). The pictures are made in the decode workers ahead of
time. A stop signal (Ctrl-C, SIGTERM) ends the session normally: every answer is already on disk.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from pickrank.errors import Terminated, UsageError
from pickrank.options import CacheOptions, RunOptions
from pickrank.taste.pairs import Pool, pool_from_source

if TYPE_CHECKING:
    from pickrank.models.protocol import ImageTextEmbedder
    from pickrank.taste.session import LabelSession

log = logging.getLogger("pickrank")

ORDERS = ("uncertain", "random")


@dataclass(frozen=True)
class Source:
    """What to label: SOURCE arguments and what goes with them (a compare layout's prompts CSV or manifest; a
    prompt for every best-of-n group)."""

    paths: tuple[str, ...] = ()
    prompts_csv: str | None = None
    manifest: str | None = None
    prompt: str | None = None


@dataclass(frozen=True)
class LabelJob:
    """A labelling session: the source, the label file, who labels and how pairs are chosen, where the page is."""

    source: Source
    labels: str
    labeler: str = "unknown"
    order: str = "uncertain"
    seed: int = 0
    host: str = "127.0.0.1"
    port: int = 8766
    token: str | None = None
    run: RunOptions = field(default_factory=RunOptions)
    cache: CacheOptions = field(default_factory=CacheOptions)


def plan(job: LabelJob) -> Pool:
    """Check the job and read SOURCE, before any model loads (a bad folder or option fails here)."""
    from pickrank.serve.server import check_exposure

    if job.order not in ORDERS:
        raise UsageError(f"--order {job.order}: use uncertain or random")
    if not job.labeler.strip():
        raise UsageError("--labeler: give a name")
    check_exposure(job.host, job.token, insecure_no_auth=False)
    s = job.source
    return pool_from_source(s.paths, s.prompts_csv, s.manifest, s.prompt, job.run.max_pixels, job.run.max_bytes)


class Scoring:
    """Scores the pool's candidates in a thread (the engine, through the cache), handing each prompt's scores to
    the session as they come; `stop` ends it after the prompt in hand."""

    def __init__(self, session: LabelSession, embedder: ImageTextEmbedder, job: LabelJob) -> None:
        self.session, self.embedder, self.job = session, embedder, job
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pickrank-label-scoring", daemon=True)

    def start(self) -> "Scoring":
        self.thread.start()
        return self

    def _run(self) -> None:
        from pickrank.core.cache import open_cache
        from pickrank.core.scoring import make_engine

        pool = self.session.pool
        cache = open_cache(self.job.cache.cache, enabled=not self.job.cache.no_cache)
        try:
            for ranking in make_engine(self.embedder, self.job.run, cache=cache).rank(pool.sets()):
                if self.stopped.is_set() or not ranking.records:
                    break
                slot = int(ranking.records[0].id)  # type: ignore[arg-type]
                ids = {pool.candidates[m].path: m for m in pool.slots[slot].members}
                self.session.set_scores(slot, {ids[r.path]: r.score for r in ranking.records  # type: ignore[index]
                                               if r.score is not None and r.path in ids})
        except Exception as e:  # noqa: BLE001 - the page goes on with random pairs
            log.warning("scoring stopped (%s: %s): the pairs are random from now on", type(e).__name__, e)
        finally:
            cache.close()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)


def run_label(job: LabelJob, pool: Pool, embedder: ImageTextEmbedder | None,
              on_listening: Callable[[str], None]) -> int:
    """Serve the label page until a stop signal; the number of labels made in this session."""
    from pickrank.core.backend import default_workers
    from pickrank.taste.images import DisplayImages
    from pickrank.taste.labels import LabelFile
    from pickrank.taste.page import label_page
    from pickrank.taste.server import LabelApp, allowed_hosts, serve
    from pickrank.taste.session import LabelSession, SessionOptions

    labels = LabelFile(job.labels)
    workers = default_workers() if job.run.workers is None else job.run.workers
    pictures = [c.data or c.path for c in pool.candidates]  # a dataset sample's bytes, else its file
    images = DisplayImages(pictures, min(workers, 4), max_pixels=job.run.max_pixels, max_bytes=job.run.max_bytes)
    session = LabelSession(pool, labels, SessionOptions(job.labeler, job.order, job.seed), images)
    scoring = Scoring(session, embedder, job).start() if embedder is not None else None
    page, policy = label_page(" ".join(job.source.paths or (job.source.manifest or "",)), job.labeler, job.labels)
    try:
        serve(lambda port: LabelApp(session, page, policy, job.token, allowed_hosts(job.host, port)), job.host,
              job.port, on_listening)
    except (KeyboardInterrupt, Terminated):
        pass  # the normal end of a session: every answer is on disk already
    finally:
        if scoring is not None:
            scoring.stop()
        images.close()
    return session.made


__all__ = ["ORDERS", "Source", "LabelJob", "plan", "Scoring", "run_label"]
