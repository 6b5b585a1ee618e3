"""Wires the stages in order: discover -> read -> cache -> embed misses in batches -> score/rank -> records.

This module is the one place that knows the order, for the CLI, `PickScorer.rank` and `pickrank eval` alike.
Images stream through a bounded window of decode jobs in worker processes, so memory stays flat whatever the number
of images; each distinct image (by content) reaches the model at most once per run, and each distinct prompt is
encoded once.

    CandidateSet --read_item--> Entry (path, key | error) --memo / cache / Backend--> Finished (keys, embeddings)
        --_Pass.take--> per-set vectors --Engine._rank (score.py)--> Ranking (Records)

torch is imported only where scores are computed, and only for the torch backend: the CLI hands the engine a model
still loading in a thread (`loading.LoadingEmbedder`), and reading, hashing, cache lookups and decoding start before
torch is in. With an ONNX export (`embedder.backend == "onnx"`) embeddings and scores are numpy arrays and torch is
never imported (`score.py` computes on either).
"""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np

from pickrank.core.backend import Backend, LocalBackend
from pickrank.core.cache import NullCache
from pickrank.core.discovery import Discovery
from pickrank.core.kept import Kept
from pickrank.errors import InputFailed, NonFiniteScores
from pickrank.inputs.files import ReadError, content_key, read_bytes
from pickrank.inputs.imagestats import STAT_NAMES, ImageStats
from pickrank.inputs.textfile import check_text
from pickrank.options import RunOptions
from pickrank.records import (
    CandidateSet,
    Entry,
    Finished,
    ImageBytes,
    Item,
    Progress,
    Query,
    Record,
    RunSummary,
    Unreadable,
)

if TYPE_CHECKING:
    import torch

    from pickrank.models.protocol import ImageTextEmbedder

log = logging.getLogger("pickrank")

# The error of an image whose embedding, or score, the model gave as NaN or infinity: never cached, never ranked.
NONFINITE_EMBEDDING = "the model gave a non-finite embedding (NaN or infinity)"
NONFINITE_SCORE = "non-finite score (NaN or infinity): the model's text embedding or scale is not finite"


@dataclass(frozen=True)
class Ranking:
    """One finished candidate set: its records in output order (query by query, best first)."""

    records: tuple[Record, ...]
    failed: int = 0



class _LRU(collections.OrderedDict):
    """A dict that forgets its least recently used entries beyond `size` (None: a plain, unbounded dict)."""

    def __init__(self, size: int | None = None) -> None:
        super().__init__()
        self.size = size

    def fresh(self, key: str):
        """The value (None when absent), now the most recently used."""
        value = self.get(key)
        if value is not None and self.size is not None:
            self.move_to_end(key)
        return value

    def put(self, key: str, value: object) -> None:
        self[key] = value
        if self.size is not None:
            self.move_to_end(key)
            while len(self) > self.size:
                self.popitem(last=False)


def read_item(item: Item, max_bytes: int | None) -> tuple[Entry, bytes | None]:
    """The read stage: a path's bytes (`read_bytes`, within max_bytes) or in-memory bytes as they are, and their
    content key; a path that cannot be read is an Entry with the reason (and no bytes), as is an Unreadable."""
    if isinstance(item, Unreadable):
        return Entry(item.name, None, item.error), None
    if isinstance(item, ImageBytes):
        return Entry(item.name, content_key(item.data)), item.data
    try:
        data = read_bytes(item, max_bytes)
    except ReadError as e:
        return Entry(item, None, str(e)), None
    return Entry(item, content_key(data)), data


def encode_prompts(embedder: ImageTextEmbedder, texts: list[str], warn: bool = True) -> tuple[torch.Tensor, list[bool]]:
    """Normalised text embeddings (N, D) and truncation flags; each prompt cut at 77 tokens is named in a warning. A
    prompt that is not valid text is an InvalidText before the model sees any (`textfile.check_text`)."""
    for i, text in enumerate(texts):
        check_text(text, f"prompt {i + 1}" if len(texts) > 1 else "prompt")
    emb, truncated = embedder.embed_texts(texts)
    for text, cut in zip(texts, truncated):
        if cut and warn:
            log.warning("prompt longer than 77 tokens, truncated as the reference does: %r",
                        text if len(text) <= 80 else text[:77] + "...")
    return emb, truncated


def encode_paired(embedder: ImageTextEmbedder, prompts: list[str],
                  warn: bool = True) -> tuple["torch.Tensor | np.ndarray", list[bool]]:
    """One normalised text embedding per item of `prompts` (N, D), each distinct prompt encoded once, and whether
    each item's prompt was truncated (PickScorer.score and the reward server pair prompts with images this way).
    A torch tensor from the torch embedder, a numpy array from an ONNX export's."""
    from pickrank.core.scores import as_array

    unique = list(dict.fromkeys(prompts))
    pos = {p: i for i, p in enumerate(unique)}
    index = [pos[p] for p in prompts]
    text, truncated = encode_prompts(embedder, unique, warn)
    return text[as_array(np.asarray(index, dtype=np.int64), embedder.backend)], [truncated[i] for i in index]


class _Prompts:
    """A run's distinct prompts, all known up front, encoded together on first use: image decoding starts while
    the model still loads.

    Per distinct image the engine keeps its scores against every prompt (P floats) when that is smaller than the
    embedding, else the embedding; either way memory per image is small and bounded by min(P, D).
    """

    def __init__(self, embedder: ImageTextEmbedder, summary: RunSummary, sets: list[CandidateSet],
                 warn: bool = True) -> None:
        self.embedder, self.summary, self.warn = embedder, summary, warn
        prompts = dict.fromkeys(q.prompt for s in sets if s.error is None for q in s.queries)
        self.index = {p: i for i, p in enumerate(prompts)}
        self._text: torch.Tensor | None = None
        self._truncated: dict[str, bool] = {}

    @property
    def text(self) -> torch.Tensor:
        """The normalised prompt embeddings (P, D), in index order (waits for the model)."""
        if self._text is None and not self.index:  # every set failed before it had a prompt: no image is scored
            self._text = np.empty((0, 0), dtype=np.float32)
        if self._text is None:
            text, truncated = encode_prompts(self.embedder, list(self.index), self.warn)
            self._truncated = dict(zip(self.index, truncated))
            self.summary.truncated += sum(truncated)
            self._text = text
        return self._text

    def truncated(self, prompt: str) -> bool:
        """Whether the prompt was cut at 77 tokens (the flags come with the encoding)."""
        self.text  # noqa: B018 - encodes the prompts if that has not happened yet
        return self._truncated.get(prompt, False)

    @property
    def keep_scores(self) -> bool:
        return len(self.index) <= self.text.shape[1]

    def to_memo(self, emb: torch.Tensor | np.ndarray) -> torch.Tensor:
        """What the run keeps per image, from (N, D) embeddings. One matrix-vector product per image: the result
        does not depend on which batch the image came in."""
        from pickrank.core.scores import as_array, pick_scores, stack

        emb = as_array(emb, self.embedder.backend)
        if not self.keep_scores:
            return emb
        return stack([pick_scores(self.text, e[None], self.embedder.scale, self.embedder.head)[:, 0] for e in emb])

    def scorer(self, prompt: str) -> Callable[[torch.Tensor], float]:
        """The score of `prompt` from what to_memo kept."""
        from pickrank.core.scores import pick_scores

        pi = self.index[prompt]
        if self.keep_scores:
            return lambda v: float(v[pi])
        text, scale, head = self.text[pi:pi + 1], self.embedder.scale, self.embedder.head
        return lambda v: float(pick_scores(text, v[None], scale, head)[0, 0])


class _PromptStream:
    """The prompts of a stream of small sets (eval's pairs), chunk by chunk: each chunk's new prompts are encoded
    together on first use and kept, with the images' embeddings, in bounded LRU memos."""

    def __init__(self, embedder: ImageTextEmbedder, summary: RunSummary, size: int, warn: bool = True) -> None:
        self.embedder, self.summary, self.warn = embedder, summary, warn
        self.vectors, self.flags = _LRU(size), _LRU(size)
        self.pending: dict[str, None] = {}

    def add(self, sets: list[CandidateSet]) -> None:
        """A chunk's prompts; those not in the memo wait to be encoded."""
        for p in dict.fromkeys(q.prompt for s in sets if s.error is None for q in s.queries):
            if self.vectors.fresh(p) is None:
                self.pending[p] = None

    def _encode(self) -> None:
        if self.pending:
            texts, self.pending = list(self.pending), {}
            emb, truncated = encode_prompts(self.embedder, texts, self.warn)
            self.summary.truncated += sum(truncated)
            for i, p in enumerate(texts):
                self.vectors.put(p, emb[i])
                self.flags.put(p, truncated[i])

    def truncated(self, prompt: str) -> bool:
        self._encode()
        return bool(self.flags.get(prompt))

    def to_memo(self, emb: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The embeddings themselves: the prompts to come are not known yet."""
        from pickrank.core.scores import as_array

        return as_array(emb, self.embedder.backend)

    def scorer(self, prompt: str) -> Callable[[torch.Tensor], float]:
        from pickrank.core.scores import pick_score

        self._encode()
        text, scale, head = self.vectors[prompt], self.embedder.scale, self.embedder.head
        return lambda v: pick_score(text, v, scale, head)


@dataclass
class _SetState:
    """A candidate set in flight: its entries, what their keys resolved to (a memo value, or why they failed), and
    how many keys it still waits on."""

    cset: CandidateSet
    entries: list[Entry] = field(default_factory=list)
    found: dict[str, torch.Tensor] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    waiting: int = 0
    exhausted: bool = False


class _Pass:
    """One run's state: the memo of resolved images, the sets in flight (oldest first), which sets wait on which
    key, and the backend (made on the first miss, so that a fully cached run starts no worker)."""

    def __init__(self, engine: Engine, prompts: _Prompts | _PromptStream, memo: _LRU, failed: _LRU) -> None:
        self.engine, self.prompts, self.memo, self.failed = engine, prompts, memo, failed
        self.waiters: dict[str, list[_SetState]] = {}
        self.pending: dict[str, int] = {}  # images (by name) waiting on each key: done when it resolves
        self.states: collections.deque[_SetState] = collections.deque()
        self.backend: Backend | None = None

    def admit(self, cset: CandidateSet, items: Iterable[Item] | None = None) -> Iterator[Ranking]:
        """Look up the set's images (`items`, else its paths) one by one; yields the rankings that finish
        meanwhile."""
        st = _SetState(cset)
        self.states.append(st)
        if cset.error is not None:  # a set that cannot be scored (no prompt, an unlistable folder): one failed input
            self.engine.summary.images += 1
            self.engine.summary.failures += 1
        else:
            seen: set[str] = set()
            for item in cset.paths if items is None else items:
                if self.look_up(st, item, seen):
                    self.make_room()
                    yield from self.emit()
        st.exhausted = True
        yield from self.emit()

    def look_up(self, st: _SetState, item: Item, seen: set[str]) -> bool:
        """Read and hash one image, then resolve it from the memo or the cache, or wait on it; True when it went to
        the backend."""
        self.engine.summary.images += 1
        entry, data = read_item(item, self.engine.options.max_bytes)
        st.entries.append(entry)
        if entry.key is None:
            self.fail(entry.path, entry.error or "failed")
            self.engine.progress(1)
            return False
        key = entry.key
        if self.engine.kept is not None:
            self.engine.kept.name(entry.path, key)
        if key in seen:  # a copy under another name: scored once, reported for each name
            self.wait_or_done(key)
            return False
        seen.add(key)
        if self.known(st, entry):
            self.engine.progress(1)
            return False
        st.waiting += 1
        if key in self.waiters:
            self.waiters[key].append(st)
            self.wait_or_done(key)
            return False
        self.waiters[key] = [st]
        self.pending[key] = 1
        if self.from_cache(key):
            return False
        if self.backend is None:
            self.backend = self.engine.make_backend()
        self.backend.submit(key, data)  # type: ignore[arg-type]
        return True

    def wait_or_done(self, key: str) -> None:
        """One more image named `key`: done when it resolves (now, if it has)."""
        if key in self.pending:
            self.pending[key] += 1
        else:
            self.engine.progress(1)

    def known(self, st: _SetState, entry: Entry) -> bool:
        """Whether the image was resolved before in this run (embedded, or failed: reported again for this path)."""
        vec = self.memo.fresh(entry.key)  # type: ignore[arg-type]
        if vec is not None:
            st.found[entry.key] = vec  # type: ignore[index]
            return True
        reason = self.failed.get(entry.key)
        if reason is None:
            return False
        st.reasons[entry.key] = reason  # type: ignore[index]
        self.fail(entry.path, reason)
        return True

    def from_cache(self, key: str) -> bool:
        cache, fingerprint, kept = self.engine.cache, self.engine.embedder.fingerprint, self.engine.kept
        hit = cache.get_many([key], fingerprint).get(key)
        if hit is None:
            return False
        if kept is not None:  # an entry cached without its statistics is a miss when they are asked for
            stats = cache.get_stats([key], fingerprint).get(key)
            if stats is None or len(stats) != len(STAT_NAMES):
                return False
            kept.put(key, hit, ImageStats.from_values(stats))
        self.engine.summary.cache_hits += 1
        self.resolve(key, self.prompts.to_memo(hit[None])[0])
        return True

    def make_room(self) -> None:
        """After a submit: take finished work, waiting for some while the backend is full."""
        while self.backend.full:  # type: ignore[union-attr]
            self.take(self.backend.poll(block=True))  # type: ignore[union-attr]
        self.take(self.backend.poll(block=False))  # type: ignore[union-attr]

    def fail(self, path: str, reason: str) -> None:
        self.engine.fail(path, reason)

    def resolve(self, key: str, vec: torch.Tensor | None, reason: str | None = None) -> None:
        """A key's answer, for the memo and for every set waiting on it."""
        if vec is not None:
            self.memo.put(key, vec)
        else:
            self.failed.put(key, reason or "failed")
        for st in self.waiters.pop(key, []):
            st.waiting -= 1
            if vec is not None:
                st.found[key] = vec
                continue
            st.reasons[key] = reason or "failed"
            for e in st.entries:
                if e.key == key:
                    self.fail(e.path, reason or "failed")
        self.engine.progress(self.pending.pop(key, 0))

    def take(self, finished: list[Finished]) -> None:
        """Finished work from the backend: failures reported; embeddings cached (per batch) and memoised."""
        for f in finished:
            for key, reason in f.failures:
                self.resolve(key, None, reason)
            if f.keys:
                self.take_embedded(list(f.keys), f.embeddings, f.stats)

    def take_embedded(self, keys: list[str], emb: torch.Tensor | np.ndarray,
                      stats: Sequence[ImageStats | None] = ()) -> None:
        """Embedded images: those with finite embeddings cached (per batch) and memoised, the others failed (a NaN
        kept in the cache would come back in every later run); their statistics, when taken, kept beside."""
        engine = self.engine
        engine.summary.embedded += len(keys)
        finite = np.isfinite(np.asarray(emb, dtype=np.float32)).all(axis=-1)
        engine.cache.put_many({k: np.asarray(emb[i]) for i, k in enumerate(keys) if finite[i]},
                              engine.embedder.fingerprint)
        if engine.kept is not None:
            keep_stats(engine, keys, emb, finite, stats)
        vecs = self.prompts.to_memo(emb)
        for i, k in enumerate(keys):
            if finite[i]:
                self.resolve(k, vecs[i])
            else:
                engine.summary.nonfinite += 1
                self.resolve(k, None, NONFINITE_EMBEDDING)

    def emit(self) -> Iterator[Ranking]:
        """The finished sets at the head of the queue, ranked, in order."""
        while self.states and self.states[0].exhausted and self.states[0].waiting == 0:
            yield self.engine._rank(self.states.popleft(), self.prompts)

    def drain(self, final: bool) -> Iterator[Ranking]:
        """Wait for all that went to the backend (final: nothing more will), yielding rankings as they finish."""
        if self.backend is not None and (final or self.waiters):
            self.backend.finish() if final else self.backend.flush()
            while self.waiters:
                finished = self.backend.poll(block=True)
                if not finished:  # a backend must answer every key it took
                    raise RuntimeError(f"{type(self.backend).__name__} returned no result for {len(self.waiters)} "
                                       "image(s)")
                self.take(finished)
                yield from self.emit()
        yield from self.emit()

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()


def keep_stats(engine: Engine, keys: list[str], emb: torch.Tensor | np.ndarray, finite: np.ndarray,
               stats: Sequence[ImageStats | None]) -> None:
    """Embedded images' statistics cached beside their embeddings, both kept for the run's caller."""
    got = [(i, k, s) for i, (k, s) in enumerate(zip(keys, stats)) if finite[i] and s is not None]
    engine.cache.put_stats({k: np.asarray(s.values()) for _, k, s in got}, engine.embedder.fingerprint)
    for i, k, s in got:
        engine.kept.put(k, np.asarray(emb[i]), s)  # type: ignore[union-attr]


class Engine:
    """Scores candidate sets with one embedder and cache; `rank` yields each Ranking as soon as it completes.

    Reading, hashing, the cache, scoring and ranking happen here; the misses go to a backend: decode processes and
    this process by default, or what `backend` makes (`pickrank.ray.engine.RayEngine` passes one that runs them on a
    Ray cluster). `warn=False` leaves failed images and truncated prompts to the caller to report (eval does, per
    pair). `batch_size`: images per model call (--batch-size; None: the embedder's). `on_progress` gets a
    `records.Progress` each time images are resolved (in this thread) and when listing ends (in the listing thread).
    """

    # Distinct images and prompts that `rank_stream` remembers across chunks (and calls).
    STREAM_MEMO = 65536
    # What `rank_open` remembers: far more than the sets in flight, far less than a dataset's samples.
    OPEN_MEMO = 4096

    def __init__(self, embedder: ImageTextEmbedder, cache: NullCache | None = None,
                 options: RunOptions | None = None, on_progress: Callable[[Progress], None] | None = None,
                 backend: Callable[[], Backend] | None = None, warn: bool = True,
                 memo_size: int = STREAM_MEMO, batch_size: int | None = None) -> None:
        self.embedder = embedder
        self.cache = cache or NullCache()
        self.options = options or RunOptions()
        self.on_progress = on_progress
        self.summary = RunSummary()
        self.warn = warn
        self.make_backend = backend or (lambda: LocalBackend(self.embedder, self.options, batch_size=batch_size))
        self.memo_size = memo_size
        self._stream: tuple[_PromptStream, _LRU, _LRU] | None = None
        self.done = 0  # images resolved (embedded, from the cache or the memo, failed), for on_progress
        self.discovery: Discovery | None = None
        self.kept = Kept() if self.options.signals else None  # embeddings and image statistics, for the caller

    def remembered(self) -> tuple[int, int]:
        """How many prompts and images `rank_stream` remembers across calls (each at most memo_size)."""
        if self._stream is None:
            return 0, 0
        prompts, memo, _ = self._stream
        return len(prompts.vectors), len(memo)

    def progress(self, n: int) -> None:
        """`n` more images resolved: tell on_progress where the run stands."""
        self.done += n
        if self.on_progress is not None and n:
            self.report()

    def report(self) -> None:
        """A Progress event to on_progress: "loading" while the model loads, else "embedding"; the total once every
        image has been listed (that event comes from the listing thread)."""
        if self.on_progress is None:
            return
        d, s = self.discovery, self.summary
        phase = "embedding" if getattr(self.embedder, "ready", True) else "loading"
        total = d.found if d is not None and d.finished else None
        self.on_progress(Progress(phase, self.done, total, s.embedded, s.cache_hits, s.failures))

    def fail(self, path: str, reason: str) -> None:
        """An image that failed: counted, warned about (unless the caller reports it), fatal with --on-error fail."""
        self.summary.failures += 1
        if self.warn:
            log.warning("%s: %s", path, reason)
        if self.options.on_error == "fail":
            raise InputFailed(f"{path}: {reason}")

    def rank(self, sets: Iterable[CandidateSet]) -> Iterator[Ranking]:
        """Stream all sets' images through read -> cache -> backend (decode, embed) and yield finished rankings in
        order. The images are listed in a thread meanwhile (`Discovery`), so the total is known early."""
        sets = list(sets)
        run = _Pass(self, _Prompts(self.embedder, self.summary, sets, self.warn), _LRU(), _LRU())
        self.discovery = discovery = Discovery(sets, on_finished=self.report)
        self.report()
        try:
            for i, cset in enumerate(sets):
                yield from run.admit(cset, discovery.paths(i))
            yield from run.drain(final=True)
        finally:
            discovery.close()
            run.close()
        self.check_finite()

    def rank_stream(self, chunks: Iterable[list[CandidateSet]]) -> Iterator[Ranking]:
        """`rank` for a long stream of small sets (eval's pairs), taken chunk by chunk: each chunk's new prompts are
        encoded together, its images embedded before the next chunk is read; what is remembered of images and
        prompts is bounded (memo_size) and kept across calls."""
        if self._stream is None:
            self._stream = (_PromptStream(self.embedder, self.summary, self.memo_size, self.warn),
                            _LRU(self.memo_size), _LRU(self.memo_size))
        run = _Pass(self, *self._stream)
        try:
            for chunk in chunks:
                run.prompts.add(chunk)  # type: ignore[union-attr]
                for cset in chunk:
                    yield from run.admit(cset)
                yield from run.drain(final=False)
            yield from run.drain(final=True)
        finally:
            run.close()
        self.check_finite()

    def check_finite(self) -> None:
        """NonFiniteScores, naming the model, when it gave NaN or infinity and not a single finite score (once
        every ranking, with its error records, has been handed on)."""
        s = self.summary
        if s.nonfinite and not s.scored:
            model = self.embedder.describe().get("model", "the model")
            raise NonFiniteScores(f"{model}: the model gave NaN or infinity for every image ({s.nonfinite}): its "
                                  "weights are broken, or its precision overflows (try --dtype fp32)")

    def rank_open(self, sets: Iterable[CandidateSet]) -> Iterator[Ranking]:
        """`rank` for an open-ended stream of sets whose prompts are not known up front (a dataset's shards and
        captions): each set is taken only when the one before it has been read, its prompts join a bounded memo
        as it is admitted (encoded together when a ranking needs them), and nothing waits between sets."""
        run = _Pass(self, _PromptStream(self.embedder, self.summary, self.OPEN_MEMO, self.warn),
                    _LRU(self.OPEN_MEMO), _LRU(self.OPEN_MEMO))
        try:
            for cset in sets:
                run.prompts.add([cset])  # type: ignore[union-attr]
                yield from run.admit(cset)
                if len(run.states) > self.OPEN_MEMO // 4:  # cache hits queued behind a miss: let them out first
                    yield from run.drain(final=False)
            yield from run.drain(final=True)
        finally:
            run.close()
        self.check_finite()

    def unit(self, raw: float) -> float:
        """A raw score in the run's unit (`RunOptions.scale`)."""
        return self.options.scale.convert(raw, self.embedder.scale)

    def _rank(self, st: _SetState, prompts: _Prompts | _PromptStream) -> Ranking:
        cset = st.cset
        if cset.error is not None:
            return Ranking(tuple(Record(prompt=q.prompt or None, path=cset.source, id=q.id, group=q.group,
                                        error=cset.error, prompt_source=q.prompt_source)
                                 for q in cset.queries), failed=1)
        ok = [e for e in st.entries if e.error is None and e.key in st.found]
        errors = [(e.path, e.error or st.reasons.get(e.key or "", "failed")) for e in st.entries
                  if not (e.error is None and e.key in st.found)]
        records: list[Record] = []
        failed = 0
        for q in cset.queries:
            score = prompts.scorer(q.prompt)
            scored = [(e.path, score(st.found[e.key])) for e in ok]  # type: ignore[index]
            bad = [(path, NONFINITE_SCORE) for path, x in scored if not math.isfinite(x)]
            self.summary.nonfinite += len(bad)
            for path, reason in bad:
                self.fail(path, reason)
            records += self._ranked(q, [(path, x) for path, x in scored if math.isfinite(x)], prompts)
            truncated = prompts.truncated(q.prompt)
            records += [Record(prompt=q.prompt, path=path, id=q.id, group=q.group, error=reason,
                               truncated=truncated, prompt_source=q.prompt_source) for path, reason in errors + bad]
            failed = max(failed, len(errors) + len(bad))
        self.summary.rankings += len(cset.queries)
        return Ranking(tuple(records), failed=failed)

    def _ranked(self, q: Query, ok: list[tuple[str, float]], prompts: _Prompts | _PromptStream) -> list[Record]:
        """One query's records over the set's images with finite scores, best first (the first `top` of them)."""
        from pickrank.core.scores import as_array, ranks, softmax_probs

        scores = [x for _, x in ok]
        self.summary.scored += len(scores)
        as_f32 = np.asarray(scores, dtype=np.float32)  # what torch.tensor(scores, dtype=float32) holds
        probs = softmax_probs(as_array(as_f32, self.embedder.backend)).tolist() if scores else []
        rk = ranks(scores)
        truncated, top = prompts.truncated(q.prompt), self.options.top
        unit = self.unit  # probs and ranks above come from the raw scores: --scale changes only the score column
        out = []
        for i in sorted(range(len(ok)), key=lambda i: rk[i]):
            if top is not None and rk[i] > top:
                break
            out.append(Record(prompt=q.prompt, path=ok[i][0], score=unit(scores[i]), prob=probs[i], rank=rk[i],
                              id=q.id, group=q.group, truncated=truncated, prompt_source=q.prompt_source))
        return out

