"""A dataset run's candidate sets, shard after shard, and what each set stands for (`Part`, in the same order), so
that each ranking the engine hands back can be turned into dataset records and routed to its shard's output.

With --prompt, a shard is one set (its samples ranked together); with --prompt-from caption, each sample is a set
scored against its own caption. After a shard's samples come its error record when it is damaged, then an empty set
that marks its end. Samples are read lazily, one at a time, as the engine takes them.
"""

from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

from pickrank.errors import InputFailed
from pickrank.inputs.datasets.parquet import Layout, layout, open_parquet, parquet_samples
from pickrank.inputs.datasets.paths import Shard
from pickrank.inputs.datasets.samples import Sample, ShardError, sample_name, to_item, unusable
from pickrank.inputs.datasets.webdataset import tar_samples
from pickrank.options import DatasetOptions
from pickrank.records import CandidateSet, Item, Query

log = logging.getLogger("pickrank")


@dataclass(frozen=True)
class SampleInfo:
    """What a record needs of its sample besides what the engine knows: its key and uid."""

    key: str | None
    uid: str | None


@dataclass
class Part:
    """What one candidate set of a dataset run stands for: samples of a shard (by name), a shard's error record, or
    the end of a shard (an empty set, an empty ranking)."""

    shard: Shard
    kind: str  # "samples", "error" or "end"
    samples: dict[str, SampleInfo] = field(default_factory=dict)  # filled as the set's samples are read


@dataclass(frozen=True)
class Reading:
    """How a dataset run reads its shards."""

    options: DatasetOptions = field(default_factory=DatasetOptions)
    prompt: str | None = None  # None: each sample against its own caption
    max_bytes: int | None = None
    fail_fast: bool = False  # --on-error fail
    layouts: dict[str, Layout] = field(default_factory=dict)  # each parquet shard's columns, checked up front

    @property
    def by_caption(self) -> bool:
        return self.prompt is None


def check_layouts(shards: list[Shard], options: DatasetOptions, by_caption: bool) -> dict[str, Layout]:
    """Each parquet shard's columns, from its footer: a missing column is a usage error now, before the model
    loads (a file that is no parquet is left to reading, which makes it an error record)."""
    layouts = {}
    for shard in shards:
        if shard.kind == "parquet":
            try:
                with open_parquet(shard.path) as pf:
                    layouts[shard.path] = layout(pf.schema_arrow, options, by_caption, shard.path)
            except ShardError:
                continue
    return layouts


def shard_samples(shard: Shard, reading: Reading, damage: list[str]) -> Iterator[Sample]:
    """The shard's samples, read as `reading` says; the damage that ended them early, if any, is appended to
    `damage`."""
    try:
        if shard.kind == "tar":
            yield from tar_samples(shard.path, reading.options, reading.max_bytes)
            return
        with open_parquet(shard.path) as pf:
            lay = reading.layouts.get(shard.path) or layout(pf.schema_arrow, reading.options, reading.by_caption,
                                                            shard.path)
            yield from parquet_samples(pf, lay, reading.max_bytes)
    except ShardError as e:
        damage.append(str(e))


# What reads a shard's samples (`shard_samples`, or its stand-in that takes them from Ray Data).
SampleReader = Callable[[Shard, Reading, list[str]], Iterator[Sample]]


class DatasetSets:
    """Iterable over the run's candidate sets; `parts` holds, in order, what each set handed out stands for (the
    consumer pops one per ranking)."""

    def __init__(self, shards: list[Shard], reading: Reading, read: SampleReader | None = None) -> None:
        self.shards, self.reading = shards, reading
        self.read: SampleReader = read or shard_samples  # what reads a shard's samples: here, or on Ray
        self.parts: collections.deque[Part] = collections.deque()

    def __iter__(self) -> Iterator[CandidateSet]:
        for shard in self.shards:
            yield from self._shard(shard)

    def _push(self, part: Part, cset: CandidateSet) -> CandidateSet:
        self.parts.append(part)
        return cset

    def _shard(self, shard: Shard) -> Iterator[CandidateSet]:
        damage: list[str] = []
        samples = self.read(shard, self.reading, damage)
        if self.reading.prompt is not None:
            part = Part(shard, "samples")
            query = Query(prompt=self.reading.prompt, prompt_source="option")
            yield self._push(part, CandidateSet(queries=(query,), paths=self._items(samples, part)))
        else:
            for sample in samples:
                yield self._captioned(shard, sample)
        if damage:
            self._bad(shard.path, damage[0])
            query = Query(prompt=self.reading.prompt or "", prompt_source="option" if self.reading.prompt else None)
            yield self._push(Part(shard, "error"), CandidateSet(queries=(query,), error=damage[0], source=shard.path))
        yield self._push(Part(shard, "end"), CandidateSet(queries=()))

    def _items(self, samples: Iterator[Sample], part: Part) -> Iterator[Item]:
        """--prompt: the shard's samples as engine items (those unusable already say why), each noted in `part`."""
        for s in samples:
            name = sample_name(part.shard.path, s.key, s.where)
            part.samples[name] = SampleInfo(s.key, s.uid)
            yield to_item(s, name, need_caption=False)

    def _captioned(self, shard: Shard, s: Sample) -> CandidateSet:
        """--prompt-from caption: one sample against its caption, or its error record (no caption is encoded)."""
        name = sample_name(shard.path, s.key, s.where)
        part = Part(shard, "samples", {name: SampleInfo(s.key, s.uid)})
        query = Query(prompt=s.caption or "", prompt_source="caption")
        reason = unusable(s, need_caption=True)
        if reason is not None:
            self._bad(name, reason)
            return self._push(part, CandidateSet(queries=(query,), error=reason, source=name))
        return self._push(part, CandidateSet(queries=(query,), paths=(to_item(s, name, need_caption=True),)))

    def _bad(self, name: str, reason: str) -> None:
        """Say what is wrong with a sample or shard (the engine says it for the items it reads)."""
        log.warning("%s: %s", name, reason)
        if self.reading.fail_fast:
            raise InputFailed(f"{name}: {reason}")


def shard_identity(path: str) -> tuple[int, int] | None:
    """A shard file's size and modification time (ns), what tells whether it changed since it was scored."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns
