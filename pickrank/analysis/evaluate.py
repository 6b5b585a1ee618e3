"""`pickrank eval`: pairwise preference accuracy on Pick-a-Pic-style data, with the paper's tie protocol.

For each pair the model's two scores become p0, p1 = softmax(score_0, score_1). The prediction is a tie when
|p0 - p1| <= threshold, else the image with the larger probability. Credit: 1 when the prediction equals the
label (a tie predicted for a tie label counts), 0.5 when exactly one of label and prediction is a tie, else 0.
Accuracy is the mean credit. The threshold is given, or chosen from 0, 0.1, ..., 1 on a validation file by
maximum accuracy (the smallest on equal accuracy) and then applied to the data, as the Pick-a-Pic paper does.

Inputs:

* Pick-a-Pic parquet (a file, a folder of *.parquet shards, or a quoted glob of shards): columns `caption`,
  `jpg_0`, `jpg_1` (image bytes), `label_0`, `label_1`; read in row batches with pyarrow
  (`pip install 'pickrank[eval]'`), so memory stays flat. Labels: (1, 0) -> image 0 preferred, (0, 1) -> image 1,
  (0.5, 0.5) -> tie.
* CSV or JSON Lines with `prompt`, `image_0`, `image_1`, `label` (0, 1 or 0.5); image paths are relative to the
  file's folder.

Images are decoded from bytes in memory (no temp files) exactly as the reference processor does; each distinct
image (by SHA-256 of its bytes) is embedded once and each distinct prompt encoded once, within a bounded memo.
A pair whose image cannot be read is skipped with a warning (the command then exits 3).
"""

from __future__ import annotations

import collections
import csv
import glob
import io
import itertools
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np

from pickrank.core.backend import LocalBackend
from pickrank.core.cache import NullCache
from pickrank.core.engine import Engine, Ranking
from pickrank.errors import InvalidText, PickrankError, UsageError
from pickrank.inputs.decode import DEFAULT_MAX_PIXELS
from pickrank.inputs.textfile import check_text, loads_json, read_utf8
from pickrank.options import RunOptions, Scale, as_enum
from pickrank.records import CandidateSet, ImageBytes, Query

if TYPE_CHECKING:
    from pickrank.models.protocol import ImageTextEmbedder

log = logging.getLogger("pickrank")

TIE = 0.5
THRESHOLDS: tuple[float, ...] = tuple(i / 10 for i in range(11))
PAIR_FIELDS = ("index", "prompt", "score_0", "score_1", "p_0", "p_1", "label", "prediction", "credit", "error")
PARQUET_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
TABLE_COLUMNS = ("prompt", "image_0", "image_1", "label")
PYARROW_HINT = "reading parquet needs pyarrow: pip install 'pickrank[eval]'"


# -- the protocol -----------------------------------------------------------------------------------------

def pair_probs(score_0: float, score_1: float) -> tuple[float, float]:
    """softmax(score_0, score_1), computed stably in float64."""
    d = float(score_0) - float(score_1)
    if d >= 0:
        e = math.exp(-d)
        return 1.0 / (1.0 + e), e / (1.0 + e)
    e = math.exp(d)
    return e / (1.0 + e), 1.0 / (1.0 + e)


def predict(p_0: float, p_1: float, threshold: float) -> float:
    """0 (image 0 preferred), 1 (image 1) or 0.5 (a tie: |p0 - p1| <= threshold)."""
    if abs(p_0 - p_1) <= threshold:
        return TIE
    return 0.0 if p_0 > p_1 else 1.0


def credit(label: float, prediction: float) -> float:
    """1 for an exact match (ties included), 0.5 when either the label or the prediction is a tie, else 0."""
    if label == prediction:
        return 1.0
    if label == TIE or prediction == TIE:
        return 0.5
    return 0.0


def accuracy(labels: Sequence[float], probs: Sequence[tuple[float, float]], threshold: float) -> float:
    """Mean credit of the pairs at this tie threshold."""
    if not labels:
        return float("nan")
    return sum(credit(lab, predict(p0, p1, threshold)) for lab, (p0, p1) in zip(labels, probs)) / len(labels)


def choose_threshold(labels: Sequence[float], probs: Sequence[tuple[float, float]],
                     candidates: Iterable[float] = THRESHOLDS) -> tuple[float, float]:
    """The threshold with the highest accuracy (the smallest of equals), and that accuracy."""
    best_t, best_acc = 0.0, -1.0
    for t in candidates:
        acc = accuracy(labels, probs, t)
        if acc > best_acc + 1e-12:
            best_t, best_acc = t, acc
    return best_t, best_acc


def bootstrap_interval(credits: Sequence[float], resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean credit (pairs resampled with replacement; threshold fixed)."""
    x = np.asarray(credits, dtype=np.float64)
    if resamples <= 0 or x.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for i in range(resamples):  # one resample at a time: memory O(pairs), whatever the number of pairs
        means[i] = x[rng.integers(0, x.size, x.size)].mean()
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


# -- reading ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pair:
    """One labelled comparison; images are bytes (parquet) or paths (CSV/JSONL). `error` marks a bad row."""

    index: int
    prompt: str
    image_0: bytes | str | None
    image_1: bytes | str | None
    label: float | None
    error: str | None = None


def _import_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PickrankError(PYARROW_HINT) from None
    return pq


def _label(value: object) -> float:
    v = float(value)  # type: ignore[arg-type]
    if v not in (0.0, 1.0, TIE):
        raise ValueError(value)
    return v


def parquet_label(label_0: object, label_1: object) -> float:
    """(1, 0) -> 0, (0, 1) -> 1, (0.5, 0.5) -> 0.5; anything else is a ValueError."""
    pair = (float(label_0), float(label_1))  # type: ignore[arg-type]
    mapping = {(1.0, 0.0): 0.0, (0.0, 1.0): 1.0, (TIE, TIE): TIE}
    if pair not in mapping:
        raise ValueError(f"labels (label_0, label_1) = {pair} are not (1, 0), (0, 1) or (0.5, 0.5)")
    return mapping[pair]


def _image_bytes(value: object) -> bytes | None:
    if isinstance(value, dict):  # the datasets Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None


class Dataset:
    """A data file (or a folder of parquet shards), checked when opened; `pairs()` streams its rows."""

    def __init__(self, path: str, rows_per_batch: int = 64) -> None:
        self.path = path
        self.rows_per_batch = rows_per_batch
        if os.path.isdir(path):
            self.files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".parquet"))
            if not self.files:
                raise UsageError(f"{path}: a folder without *.parquet files")
            self.kind = "parquet"
        elif not os.path.exists(path) and glob.has_magic(path):  # a quoted glob of shards: 'data/test-*.parquet'
            self.files = sorted(glob.glob(path))
            if not self.files or not all(f.endswith(".parquet") for f in self.files):
                raise UsageError(f"{path}: the pattern must match *.parquet files only"
                                 + ("" if self.files else " (it matches nothing)"))
            self.kind = "parquet"
        elif not os.path.exists(path):
            raise UsageError(f"{path}: no such file")
        else:
            self.files = [path]
            ext = os.path.splitext(path)[1].lower()
            kinds = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
            if ext not in kinds:
                raise UsageError(f"{path}: unknown data format (use .parquet, .csv or .jsonl)")
            self.kind = kinds[ext]
        self.count: int | None = None
        if self.kind == "parquet":
            pq = _import_parquet()
            total = 0
            for f in self.files:
                try:
                    pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20)
                except Exception as e:
                    raise UsageError(f"{f}: not a readable parquet file: {e}") from None
                missing = [c for c in PARQUET_COLUMNS if c not in pf.schema_arrow.names]
                if missing:
                    raise UsageError(f"{f}: missing column(s) {', '.join(missing)} (Pick-a-Pic layout: "
                                     f"{', '.join(PARQUET_COLUMNS)})")
                total += pf.metadata.num_rows
            self.count = total
        else:
            # Small files of paths and labels: read and decoded now, so that a bad file fails before the model loads.
            self._text = read_utf8(path)
            if self.kind == "csv":
                self._csv_reader()

    def _csv_reader(self) -> csv.DictReader:
        """A reader over the CSV text, its header checked."""
        reader = csv.DictReader(io.StringIO(self._text, newline=""))
        try:
            fields = reader.fieldnames or []
        except csv.Error as e:
            raise UsageError(f"{self.path}: line 1: malformed CSV: {e}") from None
        missing = [c for c in TABLE_COLUMNS if c not in fields]
        if missing:
            raise UsageError(f"{self.path}: missing column(s) {', '.join(missing)} (needs {', '.join(TABLE_COLUMNS)})")
        return reader

    def pairs(self) -> Iterator[Pair]:
        if self.kind == "parquet":
            yield from self._parquet_pairs()
        elif self.kind == "csv":
            yield from self._table_pairs(self._csv_rows())
        else:
            yield from self._table_pairs(self._jsonl_rows())

    def _parquet_pairs(self) -> Iterator[Pair]:
        pq = _import_parquet()
        index = 0
        for f in self.files:
            # pre_buffer (pyarrow's default) keeps every row group read so far in memory: memory would grow with
            # the file; without it, and with a small read buffer, it stays flat.
            pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20)
            for batch in pf.iter_batches(batch_size=self.rows_per_batch, columns=list(PARQUET_COLUMNS)):
                cols = {c: batch.column(c).to_pylist() for c in PARQUET_COLUMNS}
                for i in range(batch.num_rows):
                    prompt = cols["caption"][i]
                    im0, im1 = _image_bytes(cols["jpg_0"][i]), _image_bytes(cols["jpg_1"][i])
                    error = None
                    label = None
                    try:
                        label = parquet_label(cols["label_0"][i], cols["label_1"][i])
                    except (TypeError, ValueError) as e:
                        error = str(e) if isinstance(e, ValueError) else "missing label"
                    if im0 is None or im1 is None:
                        error = error or "missing image bytes"
                    error = error or _prompt_problem(prompt, "missing caption")
                    yield Pair(index, _printable(prompt) if isinstance(prompt, str) else "", im0, im1, label, error)
                    index += 1
                del cols

    def _csv_rows(self) -> Iterator[tuple[int, dict]]:
        reader = self._csv_reader()
        try:
            yield from enumerate(reader)
        except csv.Error as e:  # e.g. a field over the csv module's size limit
            raise UsageError(f"{self.path}: line {reader.line_num}: malformed CSV: {e}") from None

    def _jsonl_rows(self) -> Iterator[tuple[int, dict]]:
        index = 0
        for lineno, line in enumerate(io.StringIO(self._text), start=1):
            if not line.strip():
                continue
            try:
                row = loads_json(line)
            except ValueError as e:  # malformed, or nested too deep to read safely
                raise UsageError(f"{self.path}:{lineno}: not JSON: {getattr(e, 'msg', e)}") from None
            if not isinstance(row, dict) or any(c not in row for c in TABLE_COLUMNS):
                raise UsageError(f"{self.path}:{lineno}: needs the keys {', '.join(TABLE_COLUMNS)}")
            yield index, row
            index += 1

    def _table_pairs(self, rows: Iterator[tuple[int, dict]]) -> Iterator[Pair]:
        from pickrank.inputs.datasets.refs import sample_bytes, split_ref

        base = os.path.dirname(os.path.abspath(self.path))

        def resolve(p: object) -> str | None:
            if not isinstance(p, str) or not p.strip():
                return None
            p = os.path.expanduser(p.strip())
            return p if os.path.isabs(p) else os.path.join(base, p)

        table = list(rows)  # small: the file's text is in memory already
        # images inside dataset shards (SHARD#KEY, as `pickrank label` writes them): each shard read once
        samples = sample_bytes([p for _, row in table for p in map(resolve, (row["image_0"], row["image_1"]))
                                if p is not None and split_ref(p)], None)
        for index, row in table:
            error = None
            label = None
            try:
                label = _label(row["label"])
            except (TypeError, ValueError):
                error = f"label {row['label']!r} is not 0, 1 or 0.5"
            im0, im1 = (samples.get(p, p) if p is not None else None for p in map(resolve, (row["image_0"],
                                                                                            row["image_1"])))
            if im0 is None or im1 is None:
                error = error or "missing image path"
            prompt = row["prompt"]
            error = error or _prompt_problem(prompt if isinstance(prompt, str) and prompt.strip() else None,
                                             "missing prompt")
            yield Pair(index, _printable(prompt) if isinstance(prompt, str) else "", im0, im1, label, error)


def _prompt_problem(prompt: object, missing: str) -> str | None:
    """Why a row's prompt cannot be scored (`missing` when it is not a string, or what `check_text` refuses), or
    None: that pair is an error record, the others are scored."""
    if not isinstance(prompt, str):
        return missing
    try:
        check_text(prompt, "prompt")
    except InvalidText as e:
        return str(e)
    return None


def _printable(text: str) -> str:
    """text as it can be written: a lone surrogate (a refused prompt's) as its escape, the rest as it is."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# -- scoring ----------------------------------------------------------------------------------------------

def pair_engine(embedder: "ImageTextEmbedder", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Engine:
    """The engine eval scores pairs with: no cache, bounded memos, failures reported per pair (by `score_pairs`),
    torch's threads as they are (eval's scores stay those of its earlier releases, to the last digit)."""
    options = RunOptions(max_pixels=max_pixels)
    return Engine(embedder, NullCache(), options, warn=False,
                  backend=lambda: LocalBackend(embedder, options, tune_threads=False))


def _pair_set(pair: Pair) -> CandidateSet:
    """A pair as a candidate set of its two images (bytes in memory, or paths) for its prompt."""
    items = [ImageBytes(f"image_{i}", ref) if isinstance(ref, bytes) else ref
             for i, ref in enumerate((pair.image_0, pair.image_1))]
    return CandidateSet(queries=(Query(pair.prompt),), paths=tuple(items))  # type: ignore[arg-type]


def _pair_result(cset: CandidateSet, ranking: Ranking) -> tuple[float, float] | str:
    """(score_0, score_1) from the set's records, or why the first image that failed did."""
    records = list(ranking.records)
    found = []
    for item in cset.paths:
        name = item.name if isinstance(item, ImageBytes) else item
        found.append(records.pop(next(i for i, r in enumerate(records) if r.path == name)))
    for i, (item, rec) in enumerate(zip(cset.paths, found)):
        if rec.error is not None:
            return f"image_{i}: {rec.error}" if isinstance(item, ImageBytes) else f"image_{i} {item}: {rec.error}"
    return found[0].score, found[1].score  # type: ignore[return-value]


def score_pairs(dataset: Dataset, embedder: "ImageTextEmbedder", max_pixels: int | None = DEFAULT_MAX_PIXELS,
                chunk: int | None = None, on_progress: Callable[[int], None] | None = None,
                engine: Engine | None = None) -> Iterator[tuple[Pair, tuple[float, float] | str]]:
    """Stream (pair, (score_0, score_1) or error) for every row of the dataset, in order: chunk by chunk through
    the engine, each distinct image and prompt embedded once (within its bounded memos)."""
    engine = engine or pair_engine(embedder, max_pixels)
    chunk = chunk or max(32, 4 * embedder.batch_size)
    queue: collections.deque[tuple[Pair, CandidateSet | None]] = collections.deque()

    def chunks() -> Iterator[list[CandidateSet]]:
        rows = iter(dataset.pairs())
        while part := list(itertools.islice(rows, chunk)):
            sets = [_pair_set(p) if p.error is None else None for p in part]
            # the images travel in the sets; the queue keeps the rest of each row
            queue.extend((replace(p, image_0=None, image_1=None), s) for p, s in zip(part, sets))
            yield [s for s in sets if s is not None]

    def bad_rows() -> Iterator[tuple[Pair, tuple[float, float] | str]]:
        """The rows before the next scored one that were bad already in the file."""
        while queue and queue[0][1] is None:
            pair = queue.popleft()[0]
            _progress(on_progress)
            yield pair, pair.error  # type: ignore[misc]

    for ranking in engine.rank_stream(chunks()):
        yield from bad_rows()
        pair, cset = queue.popleft()
        _progress(on_progress)
        yield pair, _pair_result(cset, ranking)  # type: ignore[arg-type]
    yield from bad_rows()


def _progress(on_progress: Callable[[int], None] | None) -> None:
    if on_progress:
        on_progress(1)


# -- the whole evaluation ---------------------------------------------------------------------------------

@dataclass
class EvalResult:
    """What `pickrank eval` reports."""

    data: str
    accuracy: float
    pairs: int
    skipped: int
    label_ties: int
    predicted_ties: int
    threshold: float
    threshold_source: str
    ci: tuple[float, float] | None
    resamples: int
    seed: int
    validation: dict | None = None
    truncated_prompts: int = 0
    embedded_images: int = 0
    model: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci"] = list(self.ci) if self.ci else None
        return d


def _scored(dataset: Dataset, embedder: "ImageTextEmbedder", max_pixels: int | None, engine: Engine,
            on_progress: Callable[[int], None] | None) -> tuple[list[float], list[tuple[float, float]], int]:
    labels, probs, skipped = [], [], 0
    for pair, res in score_pairs(dataset, embedder, max_pixels, on_progress=on_progress, engine=engine):
        if isinstance(res, str):
            skipped += 1
            log.warning("%s: pair %d skipped: %s", dataset.path, pair.index, res)
            continue
        labels.append(pair.label)
        probs.append(pair_probs(*res))
    return labels, probs, skipped


def evaluate(dataset: Dataset, embedder: "ImageTextEmbedder", threshold: float | None = None,
             validation: Dataset | None = None, resamples: int = 1000, seed: int = 0, out=None,
             max_pixels: int | None = DEFAULT_MAX_PIXELS,
             on_progress: Callable[[int], None] | None = None, scale: Scale | str = Scale.raw) -> EvalResult:
    """Score the dataset and compute the paper's accuracy; per-pair records go to `out` (a
    `pickrank.output.targets.Output`), their scores in `scale`'s unit (probabilities and predictions always come from
    the raw scores)."""
    if threshold is not None and validation is not None:
        raise UsageError("give either a tie threshold or a validation file to choose it, not both")
    engine = pair_engine(embedder, max_pixels)
    val_info = None
    if validation is not None:
        labels, probs, vskipped = _scored(validation, embedder, max_pixels, engine, on_progress)
        if not labels:
            raise PickrankError(f"{validation.path}: no pair could be scored, so no threshold can be chosen")
        threshold, vacc = choose_threshold(labels, probs)
        val_info = {"data": validation.path, "pairs": len(labels), "skipped": vskipped, "accuracy": vacc,
                    "accuracy_by_threshold": {str(t): accuracy(labels, probs, t) for t in THRESHOLDS}}
        source = f"chosen on {validation.path}"
        log.info("tie threshold %.1f chosen on %s (accuracy %.4f on %d pairs)", threshold, validation.path, vacc,
                 len(labels))
    else:
        source = "default" if threshold is None else "given"
        threshold = 0.0 if threshold is None else float(threshold)
    credits: list[float] = []
    label_ties = pred_ties = skipped = 0
    unit = as_enum(Scale, scale, "--scale value").convert
    for pair, res in score_pairs(dataset, embedder, max_pixels, on_progress=on_progress, engine=engine):
        rec = dict.fromkeys(PAIR_FIELDS)
        rec.update(index=pair.index, prompt=pair.prompt, label=pair.label)
        if isinstance(res, str):
            skipped += 1
            log.warning("%s: pair %d skipped: %s", dataset.path, pair.index, res)
            rec["error"] = res
        else:
            p0, p1 = pair_probs(*res)
            pred = predict(p0, p1, threshold)
            c = credit(pair.label, pred)  # type: ignore[arg-type]
            credits.append(c)
            label_ties += pair.label == TIE
            pred_ties += pred == TIE
            rec.update(score_0=unit(res[0], embedder.scale), score_1=unit(res[1], embedder.scale), p_0=p0, p_1=p1,
                       prediction=pred, credit=c)
        if out is not None:
            out.stream.write(json.dumps(rec, ensure_ascii=False) + "\n")
    if not credits:
        if skipped:
            raise PickrankError(f"{dataset.path}: none of the {skipped} pair(s) could be scored")
        raise UsageError(f"{dataset.path}: no pairs")
    truncated = engine.summary.truncated
    if truncated:
        log.warning("%d prompt(s) longer than 77 tokens were truncated, as the reference does", truncated)
    return EvalResult(data=dataset.path, accuracy=float(np.mean(credits)), pairs=len(credits), skipped=skipped,
                      label_ties=label_ties, predicted_ties=pred_ties, threshold=threshold,
                      threshold_source=source, ci=bootstrap_interval(credits, resamples, seed),
                      resamples=resamples, seed=seed, validation=val_info, truncated_prompts=truncated,
                      embedded_images=engine.summary.embedded, model=embedder.describe())


def format_summary(r: EvalResult) -> str:
    """The human-readable report `pickrank eval` prints."""
    ci = (f"  (95% bootstrap CI {r.ci[0]:.4f}-{r.ci[1]:.4f}, {r.resamples} resamples, seed {r.seed})"
          if r.ci else "")
    lines = [
        f"data        {r.data}",
        f"model       {r.model.get('model', '?')} ({r.model.get('device', '?')}, {r.model.get('dtype', '?')})",
        f"accuracy    {r.accuracy:.4f}{ci}",
        f"pairs       {r.pairs}" + (f" ({r.skipped} skipped)" if r.skipped else ""),
        f"ties        {r.label_ties} in the labels, {r.predicted_ties} predicted",
    ]
    if r.validation:
        v = r.validation
        lines.append(f"threshold   {r.threshold:.1f} (chosen on {v['data']} from 0, 0.1, ..., 1: accuracy "
                     f"{v['accuracy']:.4f} on {v['pairs']} pairs)")
    else:
        lines.append(f"threshold   {r.threshold:g} ({r.threshold_source})")
    return "\n".join(lines)
