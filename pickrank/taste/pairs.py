"""What `pickrank label` asks about: the candidates of SOURCE, grouped by prompt (`Pool`), and which pair comes next
(`PairPicker`): by default the pairs the current scorer is least sure about (the closest tuned scores), one in four
a random pair so that the labels stay an unbiased sample; `--order random` only random pairs; never the same pair
twice.

SOURCE is what pickrank already reads as candidate sets: a best-of-n folder (its groups), a prompts CSV with images
(`batch`'s rows), a compare layout (system folders with a prompts CSV, paired folders, or a manifest), where
pairs are always across systems: the labels are then a human A/B evaluation of the systems; or dataset shards,
whose samples are grouped by caption and named `SHARD#KEY` (as records name them; eval and tune read them back).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from pickrank.errors import UsageError
from pickrank.records import CandidateSet, ImageBytes, Item, Query
from pickrank.taste.labels import pair_key

log = logging.getLogger("pickrank")

RANDOM_SHARE = 0.25  # of the pairs asked in the default order: random ones, so that the labels stay a fair sample
_ALL_PAIRS_BELOW = 64  # a prompt with fewer candidates offers all its pairs by closeness, else near neighbours
_NEIGHBOURS = 8
_RANDOM_TRIES = 64


@dataclass(frozen=True)
class Candidate:
    """One image to show: its file (or a dataset sample's name, `SHARD#KEY`, with its image bytes in `data`), the
    prompt (slot) it belongs to, and its system in a compare layout."""

    path: str
    slot: int
    system: str | None = None
    data: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def item(self) -> Item:
        """What the engine reads: the file, or the sample's bytes."""
        return self.path if self.data is None else ImageBytes(self.path, self.data)


@dataclass(frozen=True)
class Slot:
    """A prompt and its candidates (ids into `Pool.candidates`)."""

    prompt: str
    name: str  # the group, CSV id or compare prompt id
    members: tuple[int, ...]


@dataclass(frozen=True)
class Pool:
    """Every candidate of SOURCE (its id is its index), grouped by prompt."""

    candidates: tuple[Candidate, ...]
    slots: tuple[Slot, ...]
    kind: str  # best-of-n, batch or compare

    def valid(self, a: int, b: int) -> bool:
        """Whether two candidates of a slot make a pair (across systems, in a compare layout)."""
        ca, cb = self.candidates[a], self.candidates[b]
        return a != b and (ca.system is None or ca.system != cb.system)

    def pair_count(self, slot: Slot) -> int:
        """How many pairs a slot offers."""
        if self.kind != "compare":
            return len(slot.members) * (len(slot.members) - 1) // 2
        by_system: dict[str | None, int] = {}
        for m in slot.members:
            by_system[self.candidates[m].system] = by_system.get(self.candidates[m].system, 0) + 1
        return sum(x * y for x, y in itertools.combinations(by_system.values(), 2))

    def key(self, a: int, b: int) -> tuple[str, frozenset[str]]:
        return pair_key(self.slots[self.candidates[a].slot].prompt, self.candidates[a].path, self.candidates[b].path)

    def sets(self) -> list[CandidateSet]:
        """One candidate set per slot, for the engine to score."""
        return [CandidateSet(queries=(Query(prompt=s.prompt, id=str(i)),),
                             paths=tuple(self.candidates[m].item for m in s.members)) for i, s in enumerate(self.slots)]


class _Builder:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.candidates: list[Candidate] = []
        self.slots: list[Slot] = []

    def add(self, prompt: str, name: str, images: Sequence[tuple[str, str | None]]) -> None:
        seen: dict[str, None] = {}
        members = []
        for path, system in images:
            if os.path.realpath(path) in seen:
                continue
            seen[os.path.realpath(path)] = None
            members.append(len(self.candidates))
            self.candidates.append(Candidate(os.path.abspath(path), len(self.slots), system))
        if len(members) >= 2:
            self.slots.append(Slot(prompt, name, tuple(members)))
        else:
            del self.candidates[len(self.candidates) - len(members):]
            log.warning("%s: fewer than two candidates: no pair to label", name)

    def add_samples(self, samples: Iterable[tuple[str, str, bytes]]) -> None:
        """Dataset samples (name, caption, image bytes), grouped by caption: one slot per caption, in order."""
        by_caption: dict[str, list[tuple[str, bytes]]] = {}
        for name, caption, data in samples:
            by_caption.setdefault(caption, []).append((name, data))
        for caption, found in by_caption.items():
            if len(found) < 2:
                log.warning("%s: one sample only for this caption: no pair to label", found[0][0])
                continue
            slot = len(self.slots)
            members = tuple(range(len(self.candidates), len(self.candidates) + len(found)))
            self.candidates += [Candidate(name, slot, data=data) for name, data in found]
            self.slots.append(Slot(caption, found[0][0], members))

    def pool(self) -> Pool:
        if not self.slots:
            raise UsageError("no prompt has two candidates to compare")
        return Pool(tuple(self.candidates), tuple(self.slots), self.kind)


def _from_sets(sets: list[CandidateSet], kind: str) -> Pool:
    b = _Builder(kind)
    for s in sets:
        if s.error is not None:
            log.warning("%s: %s", s.source, s.error)
            continue
        paths = [p for p in s.paths if isinstance(p, str)]
        for q in s.queries:
            b.add(q.prompt, q.group or q.id or q.prompt, [(p, None) for p in paths])
    return b.pool()


def pool_from_source(sources: Sequence[str], prompts_csv: str | None = None, manifest: str | None = None,
                     prompt: str | None = None, max_pixels: int | None = None,
                     max_bytes: int | None = None) -> Pool:
    """The candidates SOURCE names: one folder (best-of-n groups), one CSV (batch rows with images), a compare
    layout (two or more system folders, with --prompts or paired by file name, or a --manifest), or dataset shards
    (webdataset .tar or parquet: samples grouped by caption, held in memory)."""
    from pickrank.inputs.datasets.paths import uses_datasets
    from pickrank.inputs.sets import sets_for_batch, sets_for_best_of_n

    if sources and manifest is None and uses_datasets(sources):
        from pickrank.inputs.datasets.refs import captioned_samples

        b = _Builder("dataset")
        b.add_samples(captioned_samples(sources, max_bytes))
        return b.pool()
    if manifest is not None or len(sources) > 1 or prompts_csv is not None:
        return pool_from_comparison(sources, prompts_csv, manifest, max_pixels, max_bytes)
    if len(sources) != 1:
        raise UsageError("give SOURCE: a best-of-n folder, a prompts CSV with images, or a compare layout")
    source = sources[0]
    if os.path.isdir(source):
        return _from_sets(sets_for_best_of_n(source, prompt, max_pixels, max_bytes), "best-of-n")
    if os.path.isfile(source) and source.lower().endswith((".csv", ".tsv")):
        return _from_sets(sets_for_batch(source, []), "batch")
    raise UsageError(f"{source}: not a folder or a prompts CSV")


def pool_from_comparison(sources: Sequence[str], prompts_csv: str | None, manifest: str | None,
                         max_pixels: int | None, max_bytes: int | None) -> Pool:
    """A compare layout's prompts, each with every system's images (pairs across systems only)."""
    from pickrank.analysis.comparison.plan import plan_comparison

    kw = {k: v for k, v in (("max_pixels", max_pixels), ("max_bytes", max_bytes)) if v is not None}
    plan = plan_comparison(list(sources), prompts_csv=prompts_csv, manifest=manifest, **kw)
    b = _Builder("compare")
    for slot in plan.slots:
        b.add(slot.prompt, slot.id, [(p, system) for system, imgs in zip(plan.systems, slot.images) for p in imgs])
    return b.pool()


@dataclass(frozen=True)
class Planned:
    """A pair to show: the slot, the candidate shown left (image_0) and right (image_1), and how it was chosen."""

    slot: int
    left: int
    right: int
    chosen_by: str  # "uncertain" or "random"


class PairPicker:
    """Which pair comes next. `seen` holds pairs not to ask again (`Pool.key`); scores arrive per slot as the
    scorer gets to them (`set_scores`); until then, and for one pair in four, pairs are random."""

    def __init__(self, pool: Pool, seen: set, order: str = "uncertain", seed: int = 0,
                 random_share: float = RANDOM_SHARE) -> None:
        self.pool, self.seen, self.order = pool, seen, order
        self.rng = random.Random(seed)
        self.random_share = random_share
        self.close: list[tuple[float, int, int, int]] = []  # (|score difference|, tie-break, a, b): a heap
        self.weights = list(itertools.accumulate(pool.pair_count(s) for s in pool.slots))
        self.total = self.weights[-1]
        self.ids = {(pool.slots[c.slot].prompt, os.path.realpath(c.path)): i for i, c in enumerate(pool.candidates)}
        self.asked = sum(1 for k in seen if self.in_pool(k))

    def in_pool(self, key: tuple[str, frozenset[str]]) -> bool:
        """Whether a pair (`labels.pair_key`) is one this pool offers."""
        prompt, files = key
        ids = [self.ids.get((prompt, f)) for f in files]
        return len(ids) == 2 and None not in ids and self.pool.candidates[ids[0]].slot == \
            self.pool.candidates[ids[1]].slot and self.pool.valid(ids[0], ids[1])  # type: ignore[arg-type]

    def set_scores(self, slot: int, scores: dict[int, float]) -> None:
        """The current scorer's scores of a slot's candidates: its closest pairs join the queue."""
        ids = sorted(scores, key=scores.get)  # type: ignore[arg-type]
        reach = len(ids) if len(ids) < _ALL_PAIRS_BELOW else _NEIGHBOURS + 1
        for i, a in enumerate(ids):
            for b in ids[i + 1:i + reach]:
                if self.pool.valid(a, b):
                    heapq.heappush(self.close, (abs(scores[a] - scores[b]), self.rng.random(), a, b))

    def next(self) -> Planned | None:
        """The next pair (marked as seen), or None when every pair has been asked."""
        want_close = self.order == "uncertain" and self.rng.random() >= self.random_share
        pair = (self._closest() if want_close else None) or self._random() or self._closest()
        if pair is None:
            return None
        a, b, how = pair
        self.seen.add(self.pool.key(a, b))
        self.asked += 1
        if self.rng.random() < 0.5:
            a, b = b, a
        return Planned(self.pool.candidates[a].slot, a, b, how)

    def forget(self, planned: Planned) -> None:
        """Ask this pair again (an undo)."""
        self.seen.discard(self.pool.key(planned.left, planned.right))
        self.asked -= 1

    def _closest(self) -> tuple[int, int, str] | None:
        while self.close:
            _, _, a, b = heapq.heappop(self.close)
            if self.pool.key(a, b) not in self.seen:
                return a, b, "uncertain"
        return None

    def _random(self) -> tuple[int, int, str] | None:
        if self.asked >= self.total:
            return None
        for _ in range(_RANDOM_TRIES):
            slot = self.pool.slots[self._random_slot()]
            a, b = self.rng.sample(slot.members, 2)
            if self.pool.valid(a, b) and self.pool.key(a, b) not in self.seen:
                return a, b, "random"
        return self._first_unseen()

    def _random_slot(self) -> int:
        """A slot drawn in proportion to the pairs it offers."""
        import bisect

        return bisect.bisect_right(self.weights, self.rng.randrange(self.total))

    def _first_unseen(self) -> tuple[int, int, str] | None:
        """Late in a small pool random draws keep hitting labelled pairs: the first pair not asked yet."""
        for slot in self.pool.slots:
            for a, b in itertools.combinations(slot.members, 2):
                if self.pool.valid(a, b) and self.pool.key(a, b) not in self.seen:
                    return a, b, "random"
        self.asked = self.total
        return None


__all__ = ["RANDOM_SHARE", "Candidate", "Slot", "Pool", "pool_from_source", "pool_from_comparison", "Planned",
           "PairPicker"]
