"""`pickrank tune`: labels -> embeddings (from the cache, embedding only what is missing) -> a fitted head, measured
on held-out pairs, written only when it beats PickScore there (or with --force).

Image embeddings come through the embedding cache and the decode workers as every command's do; prompt embeddings
are kept in the same cache (keys `text:<sha256 of the prompt>`), so a second tune on the same labels embeds
nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from pickrank.core.backend import LocalBackend
from pickrank.core.cache import NullCache, open_cache
from pickrank.core.engine import encode_prompts, read_item
from pickrank.errors import UsageError
from pickrank.options import CacheOptions, ModelOptions, RunOptions
from pickrank.records import Finished, ImageBytes, Item
from pickrank.taste.fit import DEFAULT_FOLDS, DEFAULT_RANK, IMAGE_DIRECTIONS, PairData, Tuned, tune_head
from pickrank.taste.labels import Label, read_labels

if TYPE_CHECKING:
    from pickrank.models.protocol import ImageTextEmbedder
    from pickrank.taste.head import Head

log = logging.getLogger("pickrank")

MIN_PAIRS = 10  # fewer cannot be held out fold by fold


@dataclass(frozen=True)
class TuneOptions:
    """What `pickrank tune` does besides the model: where the head goes, and how it is fitted and measured."""

    output: str
    force: bool = False  # write the head even when it does not beat PickScore on held-out pairs
    folds: int = DEFAULT_FOLDS
    rank: int = DEFAULT_RANK  # prompt-image interaction terms (0: a taste whatever the prompt)
    directions: int = IMAGE_DIRECTIONS
    resamples: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class TuneReport:
    """What tune did: the labels used, the figures, and the head written (None: not written)."""

    files: tuple[str, ...]
    labels: int
    skipped: int  # labels whose image could not be read or embedded
    prompts: int
    images: int
    ties: int
    tuned: Tuned
    written: str | None = None
    sha256: str | None = None
    model: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        t = self.tuned
        heldout = {"pickscore": t.pickscore, "head": t.head, "difference": t.difference,
                   "interval": list(t.interval) if t.interval else None, "folds": t.folds, "fold_unit": t.fold_unit,
                   "fold_lambdas": [_num(x) for x in t.fold_lambdas]}
        return {"files": list(self.files), "labels": self.labels, "skipped": self.skipped, "prompts": self.prompts,
                "images": self.images, "ties": self.ties, "heldout": heldout, "lambda": _num(t.lam),
                "a": t.params.a, "rank": t.params.rank, "labelers": t.labelers, "written": self.written,
                "sha256": self.sha256, "model": self.model}


def _num(x: float) -> float | str:
    return x if np.isfinite(x) else "inf"


def read_all(files: Sequence[str]) -> list[Label]:
    """The labels of every file, in order; none at all is a usage error."""
    labels = [label for f in files for label in read_labels(f)]
    if not labels:
        raise UsageError(f"no labels in {', '.join(files)}")
    return labels


def check_output(path: str, inputs: Sequence[str]) -> None:
    """Before the model loads: the head's file is not an input, its folder exists, and it replaces only a head."""
    from pickrank.output.guards import same_file
    from pickrank.taste.head import is_head_file

    if any(same_file(path, f) for f in inputs if os.path.exists(path)):
        raise UsageError(f"-o {path}: is one of the label files; give another name for the head")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UsageError(f"-o {path}: {folder} is not a folder this process can write")
    if os.path.lexists(path) and not is_head_file(path):
        raise UsageError(f"-o {path}: exists and is not a pickrank head; give another name")


def text_key(prompt: str) -> str:
    """The cache key of a prompt's embedding (never a SHA-256 of image bytes, which keys are hex only)."""
    return "text:" + hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def text_embeddings(embedder: ImageTextEmbedder, prompts: list[str], cache: NullCache) -> np.ndarray:
    """Normalised embeddings (P, D) of the prompts, from the cache where it has them (new ones are kept there)."""
    keys = [text_key(p) for p in prompts]
    hits = cache.get_many(keys, embedder.fingerprint)
    missing = [p for p, k in zip(prompts, keys) if k not in hits]
    if missing:
        emb, _ = encode_prompts(embedder, missing)
        new = {text_key(p): np.asarray(emb[i], np.float32) for i, p in enumerate(missing)}
        cache.put_many(new, embedder.fingerprint)
        hits.update(new)
    return np.stack([np.asarray(hits[k], np.float32) for k in keys])


class _Embedding:
    """Image embeddings by path: read and hashed once, from the cache when there, else decoded and embedded by the
    local backend (its bounded window of decode workers); new ones go into the cache."""

    def __init__(self, embedder: ImageTextEmbedder, cache: NullCache, run: RunOptions, batch_size: int | None,
                 on_progress: Callable[[int], None] | None) -> None:
        self.embedder, self.cache, self.run, self.batch_size = embedder, cache, run, batch_size
        self.on_progress = on_progress or (lambda n: None)
        self.paths: dict[str, list[str]] = {}  # content key -> its paths
        self.found: dict[str, np.ndarray] = {}  # content key -> embedding
        self.failed: dict[str, str] = {}  # path -> why
        self.backend: LocalBackend | None = None
        self.waiting = 0

    def add(self, item: Item) -> None:
        path = item if isinstance(item, str) else item.name
        entry, data = read_item(item, self.run.max_bytes)
        if entry.key is None:
            self.failed[path] = entry.error or "failed"
            return self.on_progress(1)
        first = entry.key not in self.paths
        self.paths.setdefault(entry.key, []).append(path)
        if not first:
            return None
        hit = self.cache.get_many([entry.key], self.embedder.fingerprint).get(entry.key)
        if hit is not None:
            self.found[entry.key] = np.asarray(hit, np.float32)
            return self.on_progress(1)
        if self.backend is None:
            self.backend = LocalBackend(self.embedder, self.run, batch_size=self.batch_size)
        self.backend.submit(entry.key, data)  # type: ignore[arg-type]
        self.waiting += 1
        while self.backend.full:
            self.take(self.backend.poll(block=True))
        return None

    def take(self, finished: list[Finished]) -> None:
        for f in finished:
            for key, reason in f.failures:
                self.failed.update((p, reason) for p in self.paths[key])
            new = {k: np.asarray(f.embeddings[i], np.float32) for i, k in enumerate(f.keys)}  # type: ignore[index]
            self.cache.put_many(new, self.embedder.fingerprint)
            self.found.update(new)
            self.waiting -= len(f.keys) + len(f.failures)
            self.on_progress(len(f.keys) + len(f.failures))

    def finish(self) -> dict[str, np.ndarray]:
        """Every embedding by path (the failed ones are in `failed`)."""
        try:
            if self.backend is not None:
                self.backend.finish()
                while self.waiting:
                    self.take(self.backend.poll(block=True))
        finally:
            if self.backend is not None:
                self.backend.close()
        return {p: self.found[k] for k, paths in self.paths.items() if k in self.found for p in paths}


def image_embeddings(embedder: ImageTextEmbedder, paths: list[str], cache: NullCache, run: RunOptions,
                     batch_size: int | None = None, on_progress: Callable[[int], None] | None = None
                     ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Normalised embeddings of image files (or dataset samples named `SHARD#KEY`) by path, and why the others
    failed (read, decode)."""
    from pickrank.inputs.datasets.refs import sample_bytes, split_ref

    samples = sample_bytes([p for p in paths if split_ref(p)], run.max_bytes)
    work = _Embedding(embedder, cache, run, batch_size, on_progress)
    try:
        for path in paths:
            work.add(ImageBytes(path, samples[path]) if path in samples else path)
    except BaseException:
        if work.backend is not None:
            work.backend.close()
        raise
    return work.finish(), work.failed


def pair_data(labels: list[Label], vectors: dict[str, np.ndarray], failed: dict[str, str],
              embedder: ImageTextEmbedder, cache: NullCache) -> tuple[PairData, int]:
    """The labels whose images were embedded, as arrays; and how many were left out (each said on stderr)."""
    ok = [lab for lab in labels if lab.image_0 in vectors and lab.image_1 in vectors]
    for lab in labels:
        bad = [p for p in (lab.image_0, lab.image_1) if p not in vectors]
        if bad:
            log.warning("%s: %s; its label is left out", bad[0], failed.get(bad[0], "not embedded"))
    if len(ok) < MIN_PAIRS:
        raise UsageError(f"{len(ok)} usable label(s): tune needs at least {MIN_PAIRS} to hold pairs out")
    prompts = list(dict.fromkeys(lab.prompt for lab in ok))
    images = list(dict.fromkeys(p for lab in ok for p in (lab.image_0, lab.image_1)))
    labelers = tuple(dict.fromkeys(lab.labeler for lab in ok))
    pi, ii, li = ({x: i for i, x in enumerate(xs)} for xs in (prompts, images, labelers))
    data = PairData(text_embeddings(embedder, prompts, cache), np.stack([vectors[p] for p in images]),
                    np.array([pi[lab.prompt] for lab in ok]), np.array([ii[lab.image_0] for lab in ok]),
                    np.array([ii[lab.image_1] for lab in ok]), np.array([lab.label for lab in ok], np.float32),
                    np.array([li[lab.labeler] for lab in ok]), labelers, float(embedder.scale))
    return data, len(labels) - len(ok)


@dataclass(frozen=True)
class TuneJob:
    """A tune run's inputs: label files, model, run and cache options, and the tune's own."""

    files: tuple[str, ...]
    tune: TuneOptions
    model: ModelOptions = field(default_factory=ModelOptions)
    run: RunOptions = field(default_factory=RunOptions)
    cache: CacheOptions = field(default_factory=CacheOptions)


def run_tune(job: TuneJob, embedder: ImageTextEmbedder, labels: list[Label],
             on_progress: Callable[[int], None] | None = None) -> TuneReport:
    """Embed what the labels show, fit and measure the head, write it when it beats PickScore (or --force)."""
    cache = open_cache(job.cache.cache, enabled=not job.cache.no_cache)
    try:
        paths = list(dict.fromkeys(p for lab in labels for p in (lab.image_0, lab.image_1)))
        vectors, failed = image_embeddings(embedder, paths, cache, job.run, job.model.batch_size, on_progress)
        data, skipped = pair_data(labels, vectors, failed, embedder, cache)
    finally:
        cache.close()
    t = job.tune
    tuned = tune_head(data, t.folds, t.rank, t.directions, t.resamples, t.seed)
    report = TuneReport(job.files, len(data), skipped, len(data.text), len(data.images),
                        int((data.label == 0.5).sum()), tuned, model=embedder.describe())
    if not (tuned.beats_pickscore or t.force):
        return report
    head = write(job, embedder, report)
    return replace(report, written=job.tune.output, sha256=head.sha256)


def write(job: TuneJob, embedder: ImageTextEmbedder, report: TuneReport) -> Head:
    """The head file, with what it was fitted on and its figures in its metadata."""
    from pickrank.taste.head import base_weights, head_metadata, write_head

    t = report.tuned
    extra = {"form": "a * pickscore + linear image term" + (f" + rank-{t.params.rank} prompt-image interaction"
                                                            if t.params.rank else ""),
             "labels": report.labels, "labellers": {k: v["labels"] for k, v in t.labelers.items()},
             "report": {k: v for k, v in report.to_dict().items() if k not in ("written", "sha256", "model", "files")}}
    base = base_weights(embedder.backend, embedder.source)
    return write_head(job.tune.output, t.params, head_metadata(embedder.source.model, embedder.spec, base, extra))


def format_report(r: TuneReport) -> str:
    """The figures as `pickrank tune` prints them."""
    t = r.tuned
    ci = f" [{t.interval[0]:+.4f}, {t.interval[1]:+.4f}]" if t.interval else ""
    lines = [f"labels      {r.labels} ({r.skipped} left out), {r.prompts} prompt(s), {r.images} image(s), "
             f"{r.ties} tie(s), {len(t.labelers)} labeller(s)",
             f"held out    {t.folds} folds of {t.fold_unit} (nested cross-validation; the paper's protocol, as eval)",
             f"pickscore   {t.pickscore:.4f}",
             f"head        {t.head:.4f}",
             f"difference  {t.difference:+.4f}{ci} (95% paired bootstrap over "
             f"{'prompts' if t.fold_unit == 'prompts' else 'pairs'})",
             f"head        a = {t.params.a:.3f}, lambda = {t.lam:g}, rank {t.params.rank}"]
    if len(t.labelers) > 1:
        for name, f in t.labelers.items():
            agree = f"{f['agreement']:.3f} on {f['compared']} shared" if f["agreement"] is not None else "no shared pairs"
            lines.append(f"labeller    {name}: {f['labels']} labels, pickscore {f['pickscore']:.3f}, head "
                         f"{f['head']:.3f}, agreement with others {agree}")
    lines.append(f"written     {r.written} (sha256 {r.sha256})" if r.written else
                 "written     nothing: the head does not beat PickScore on held-out pairs (--force writes it)")
    return "\n".join(lines)


__all__ = ["MIN_PAIRS", "TuneOptions", "TuneReport", "read_all", "check_output", "text_key", "text_embeddings",
           "image_embeddings", "pair_data", "TuneJob", "run_tune", "write", "format_report"]
