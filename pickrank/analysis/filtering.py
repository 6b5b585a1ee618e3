"""`pickrank filter`: keep the best samples of a scored dataset, from the parquet scores `pickrank score` wrote.

Two passes over the scores (never over the images): the first finds the cut-offs (--top-fraction over the whole
dataset, --top-k within each prompt), the second picks the kept samples and hands them to the outputs (their keys as
parquet, DataComp's uids.npy, new webdataset shards). Only scored samples are ever kept; error records never are.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence

import numpy as np

from pickrank.errors import UsageError
from pickrank.inputs.datasets.parquet import require_pyarrow
from pickrank.inputs.datasets.paths import find_shards
from pickrank.output.guards import check_outputs
from pickrank.output.kept import KeptKeys, UidsFile
from pickrank.output.reshard import Resharder, check_reshard_folder

if TYPE_CHECKING:
    import pyarrow as pa

# The columns of a dataset's scores that filtering reads (what `pickrank score` writes for shards).
COLUMNS = ("key", "uid", "shard", "prompt", "score", "error")
# The provenance fields that must agree for scores to be compared: the same model, weights, precision,
# preprocessing and unit.
SAME_RUN = ("model", "weights", "dtype", "preprocessing", "scale")
PROVENANCE_KEY = b"pickrank.provenance"
STAMP_KEY = b"pickrank.shard"
BATCH_ROWS = 65536


@dataclass(frozen=True)
class Selection:
    """What to keep: every criterion given must hold."""

    min_score: float | None = None
    top_fraction: float | None = None  # of the scored samples, over the whole dataset (ties at the cut-off kept)
    top_k: int | None = None  # per prompt (ties broken by order)

    def __post_init__(self) -> None:
        if self.min_score is None and self.top_fraction is None and self.top_k is None:
            raise UsageError("nothing to filter by: give --min-score, --top-fraction or --top-k")
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise UsageError(f"--top-fraction {self.top_fraction}: give a fraction above 0, at most 1")
        if self.min_score is not None and not math.isfinite(self.min_score):
            raise UsageError(f"--min-score {self.min_score}: give a finite number")


@dataclass(frozen=True)
class ScoreFiles:
    """The score files of one run, checked: their provenance (the first one's), and each shard's size and mtime
    when it was scored (from per-shard outputs' stamps)."""

    files: list[str]
    provenance: dict | None
    shards: dict[str, tuple[int, int]] = field(default_factory=dict)


def _file_meta(path: str, pq: Any) -> tuple[dict | None, dict | None]:
    """A score file's provenance and stamp; a usage error for a file that is not a dataset's scores."""
    try:
        meta = pq.read_metadata(path)
        names = set(pq.read_schema(path).names)
    except Exception as e:
        raise UsageError(f"{path}: not a readable parquet file ({e})") from None
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise UsageError(f"{path}: not a dataset's scores (no column {', '.join(missing)}): give what pickrank "
                         "score wrote for shards")
    kv = meta.metadata or {}
    loaded = [json.loads(kv[k]) if k in kv else None for k in (PROVENANCE_KEY, STAMP_KEY)]
    return loaded[0], loaded[1]


def check_score_files(args: Sequence[str]) -> ScoreFiles:
    """The score files the arguments name (files, folders, globs, brace ranges), all from runs that scored the
    same way (else a usage error: their scores cannot be compared)."""
    pq = require_pyarrow("pickrank filter")
    found = find_shards(args)
    shard = next((s.path for s in found if s.kind != "parquet"), None)
    if shard is not None:
        raise UsageError(f"{shard}: a shard, not a dataset's scores: give what pickrank score SHARDS -o DIR/ wrote")
    files = [s.path for s in found]
    first: dict | None = None
    shards: dict[str, tuple[int, int]] = {}
    for path in files:
        prov, stamp = _file_meta(path, pq)
        if prov is not None:
            if first is None:
                first = prov
            differ = [k for k in SAME_RUN if prov.get(k) != first.get(k)]
            if differ:
                raise UsageError(f"{path}: scored another way than {files[0]} ({', '.join(differ)}): scores "
                                 "cannot be compared; filter them separately")
        if stamp is not None and stamp.get("size") is not None:
            shards[stamp["shard"]] = (stamp["size"], stamp["mtime_ns"])
    return ScoreFiles(files, first, shards)


def _batches(files: Sequence[str], columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    import pyarrow.parquet as pq

    for path in files:
        yield from pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=BATCH_ROWS, columns=list(columns))


def _scored(batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
    """A batch's scores (NaN where none) and whether each row is a scored sample (no error, a finite score)."""
    scores = batch.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
    ok = batch.column("error").is_null().to_numpy(zero_copy_only=False) & np.isfinite(scores)
    return scores, ok


class Cutoffs:
    """The first pass: the score at the --top-fraction cut-off, and each prompt's k-th best (score, order)."""

    def __init__(self, selection: Selection) -> None:
        self.selection = selection
        self.parts: list[np.ndarray] = []
        self.best: dict[str | None, list[tuple[float, int]]] = {}  # per prompt, a min-heap of its k best
        self.threshold: float | None = None
        self.total = self.scored = 0

    def add(self, batch: pa.RecordBatch, start: int) -> None:
        scores, ok = _scored(batch)
        self.total += len(scores)
        self.scored += int(ok.sum())
        if self.selection.top_fraction is not None:
            self.parts.append(scores[ok])
        if self.selection.top_k is not None:
            prompts = batch.column("prompt").to_pylist()
            for i in np.flatnonzero(ok):
                heap = self.best.setdefault(prompts[i], [])
                item = (float(scores[i]), -(start + int(i)))  # higher score first, then earlier
                if len(heap) < self.selection.top_k:
                    heapq.heappush(heap, item)
                elif item > heap[0]:
                    heapq.heapreplace(heap, item)

    def finish(self) -> None:
        fraction = self.selection.top_fraction
        if fraction is not None and self.scored:
            scores = np.concatenate(self.parts)
            n = max(1, math.ceil(fraction * len(scores)))
            self.threshold = float(-np.partition(-scores, n - 1)[n - 1])
        self.parts = []

    def keep(self, batch: pa.RecordBatch, start: int) -> np.ndarray:
        """Which rows of a batch (the second pass, same order) are kept."""
        scores, keep = _scored(batch)
        sel = self.selection
        if sel.min_score is not None:
            keep &= scores >= sel.min_score
        if sel.top_fraction is not None:
            keep &= scores >= (self.threshold if self.threshold is not None else np.inf)
        if sel.top_k is not None:
            prompts = batch.column("prompt").to_pylist()
            for i in np.flatnonzero(keep):
                heap = self.best.get(prompts[i], [])
                keep[i] = len(heap) < sel.top_k or (float(scores[i]), -(start + int(i))) >= heap[0]
        return keep


class KeptSink(Protocol):
    """Where kept samples go (the kept keys, the uids, new shards)."""

    def take(self, kept: pa.Table) -> None:
        """Kept rows (the COLUMNS), in dataset order."""

    def finish(self, summary: dict) -> None:
        """Every kept row has been taken: write what is left (summary: the selection and its counts)."""


@dataclass(frozen=True)
class Filtered:
    """What a filter did."""

    total: int
    scored: int
    kept: int
    threshold: float | None
    failed: int = 0


def select(scores: ScoreFiles, selection: Selection, sinks: Sequence[KeptSink]) -> Filtered:
    """Both passes: the cut-offs from every score, then each kept row handed to every sink, in dataset order."""
    import pyarrow as pa

    cut = Cutoffs(selection)
    start = 0
    for batch in _batches(scores.files, ("prompt", "score", "error")):
        cut.add(batch, start)
        start += batch.num_rows
    cut.finish()
    start = kept = 0
    for batch in _batches(scores.files, COLUMNS):
        mask = cut.keep(batch, start)
        start += batch.num_rows
        if mask.any():
            rows = pa.Table.from_batches([batch]).filter(pa.array(mask))
            kept += rows.num_rows
            for sink in sinks:
                sink.take(rows)
    summary = {"selection": asdict(selection), "threshold": cut.threshold, "samples": cut.total,
               "scored": cut.scored, "kept": kept, "scores": scores.files}
    for sink in sinks:
        sink.finish(summary)
    return Filtered(cut.total, cut.scored, kept, cut.threshold)


@dataclass(frozen=True)
class FilterJob:
    """What `pickrank filter` hands over: the score files, the selection, and the outputs (at least one)."""

    scores: tuple[str, ...]
    selection: Selection
    kept: str | None = None  # the kept keys, as parquet
    uids: str | None = None  # DataComp's uids.npy
    reshard: str | None = None  # a folder for new webdataset shards
    samples_per_shard: int = 10_000
    max_bytes: int | None = None  # members larger are not copied (None: no limit)


def _open_sinks(job: FilterJob, scores: ScoreFiles, closables: list) -> list[KeptSink]:
    """The job's outputs, checked (before anything is read twice) and opened into `closables` one by one (a
    Resharder first, when there is one)."""

    if not (job.kept or job.uids or job.reshard):
        raise UsageError("say what to write: -o KEPT.parquet, --uids FILE.npy and/or --reshard FOLDER")
    for option, path, ext in (("-o", job.kept, ".parquet"), ("--uids", job.uids, ".npy")):
        if path is not None and not path.lower().endswith(ext):
            raise UsageError(f"{option} {path}: name it *{ext}")
    check_outputs([("-o", job.kept), ("--uids", job.uids)], scores.files)
    sinks: list[Any] = []
    if job.reshard:
        check_reshard_folder(job.reshard)
        sinks.append(Resharder(job.reshard, job.samples_per_shard, scores.shards, job.max_bytes))
    if job.kept:
        sinks.append(KeptKeys(job.kept, scores.provenance))
    if job.uids:
        sinks.append(UidsFile(job.uids))
    closables.extend(sinks)
    return sinks


def filter_dataset(job: FilterJob, closables: list) -> Filtered:
    """Keep a scored dataset's samples by the job's selection and write the job's outputs (opened into
    `closables`, which the caller closes, or discards when the filter fails)."""
    scores = check_score_files(job.scores)
    sinks = _open_sinks(job, scores, closables)
    result = select(scores, job.selection, sinks)
    failed = sinks[0].failed if isinstance(sinks[0], Resharder) else 0
    return Filtered(result.total, result.scored, result.kept, result.threshold, failed)
