"""A dataset run's outputs: each ranking turned into dataset records (key, uid, shard) and gathered per shard;
each finished shard handed on whole, to the run's writers or to its own parquet file under `-o DIR/`.

A per-shard file is written atomically when its shard is finished and stamped (key-value metadata) with what a
rerun compares before skipping it: the model fingerprint, the prompt, the scale, how samples were read, and the
shard's size and modification time. A shard whose samples were not all read (a SIGTERM, a crash) has no file.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol, Sequence

import numpy as np

from pickrank.core.scores import ranks, softmax_probs
from pickrank.errors import OutputError, UsageError
from pickrank.inputs.datasets.paths import Shard
from pickrank.inputs.datasets.sets import Part, shard_identity
from pickrank.options import Scale
from pickrank.output.parquet import provenance_metadata, records_table
from pickrank.output.sinks import Sink, SinkBase, write_ranking
from pickrank.output.targets import Output
from pickrank.output.writers import record_fields
from pickrank.records import Record
from pickrank.signals import signals_deferred

log = logging.getLogger("pickrank")

# The key-value metadata key of a per-shard output's stamp (JSON).
STAMP_KEY = "pickrank.shard"
STAMP_VERSION = 1


class ShardReceiver(Protocol):
    """What takes each finished shard's records."""

    wants_meta: bool

    def set_meta(self, meta: dict) -> None:
        """The run's provenance, once the model has loaded."""

    def shard_done(self, shard: Shard, records: tuple[Record, ...], damaged: bool) -> None:
        """A shard's records, all of them (damaged: it could not be read to its end)."""


def rerank(records: list[Record], divisor: float) -> list[Record]:
    """--prompt-from caption: a shard's samples that share a caption ranked together (rank, and prob over the
    group from the raw scores, as for folders), groups in order of first appearance; error records after."""
    groups: dict[str | None, list[Record]] = {}
    for r in records:
        if r.error is None:
            groups.setdefault(r.prompt, []).append(r)
    out: list[Record] = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])  # ranked alone by the engine: rank 1, prob 1
            continue
        raw = [float(r.score) * divisor for r in group]  # type: ignore[arg-type]
        probs = softmax_probs(np.asarray(raw, dtype=np.float32)).tolist()
        rk = ranks(raw)
        out += [replace(group[i], rank=rk[i], prob=probs[i]) for i in sorted(range(len(group)), key=rk.__getitem__)]
    return out + [r for r in records if r.error is not None]


class DatasetRecords(SinkBase):
    """The one sink a dataset run scores into: pops the `Part` of each ranking, turns its records into dataset
    records, and hands each shard's records on when its end comes. A shard not finished is handed to no one."""

    wants_meta = True  # for the receivers that want it, and for --prompt-from caption's ranks in the run's unit

    def __init__(self, parts: collections.deque[Part], receivers: Sequence[ShardReceiver], by_caption: bool,
                 scale: Scale) -> None:
        self.parts, self.receivers, self.by_caption, self.scale = parts, receivers, by_caption, scale
        self.current: list[Record] = []
        self.damaged = False
        self.meta: dict | None = None

    def describe(self) -> str:
        return "the dataset's outputs"

    def set_meta(self, meta: dict) -> None:
        self.meta = meta
        for r in self.receivers:
            if r.wants_meta:
                r.set_meta(meta)

    def write(self, records: tuple[Record, ...]) -> None:
        part = self.parts.popleft()
        shard = os.path.abspath(part.shard.path)
        if part.kind == "error":
            self.damaged = True
            self.current += [replace(r, path=shard, shard=shard) for r in records]
        elif part.kind == "samples":
            for r in records:
                info = part.samples.get(r.path or "")
                key, uid = (info.key, info.uid) if info is not None else (None, None)
                self.current.append(replace(r, path=key, key=key, uid=uid, shard=shard))
        else:
            self._finish(part.shard)

    def _finish(self, shard: Shard) -> None:
        records = self.current
        if self.by_caption and self.meta is not None:
            records = rerank(records, self.scale.divisor(float(self.meta["exp_logit_scale"])))
        done, damaged = tuple(records), self.damaged
        self.current, self.damaged = [], False
        for r in self.receivers:
            r.shard_done(shard, done, damaged)

    def close(self) -> None:
        """The shard in progress, if any, is left out whole: its samples were not all read."""

    def discard(self) -> None:
        """As close: finished shards are whole wherever they went."""


class ToSinks:
    """Hands each finished shard to the run's writers (stdout, one -o file, --meta) as one write."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = list(sinks)
        self.wants_meta = any(s.wants_meta for s in self.sinks)

    def set_meta(self, meta: dict) -> None:
        for s in self.sinks:
            if s.wants_meta:
                s.set_meta(meta)

    def shard_done(self, shard: Shard, records: tuple[Record, ...], damaged: bool) -> None:
        for s in self.sinks:
            write_ranking(s, records)


@dataclass(frozen=True)
class Stamp:
    """What a per-shard output was made with: a rerun skips the shard only when all of it matches."""

    fingerprint: str  # the model, its dtype and preprocessing (the embedding cache's fingerprint)
    prompt: str | None  # None: each sample's caption
    scale: str
    reading: str  # the --image-key/--caption-key/--*-column choices, as JSON
    shard: str  # the input's absolute path
    size: int | None  # the input's size and mtime when it was scored
    mtime_ns: int | None

    # How each field is named when it differs.
    WHAT = {"fingerprint": "the model (or its --dtype, --alpha, --decode, --head)", "prompt": "the prompt",
            "scale": "--scale", "reading": "the sample columns or keys", "shard": "the input shard's path",
            "size": "the input shard (its size)", "mtime_ns": "the input shard (its modification time)"}

    def differs(self, other: Stamp) -> str | None:
        """What differs from another stamp, in words (None: they match)."""
        theirs = asdict(other)
        for name, value in asdict(self).items():
            if theirs[name] != value:
                return self.WHAT.get(name, name)
        return None


def read_stamp(path: str) -> tuple[Stamp, dict] | None:
    """The stamp of a per-shard output pickrank wrote, and its written counts; None when the file is not one
    (not parquet, or without a stamp)."""
    from pickrank.inputs.datasets.parquet import require_pyarrow

    pq = require_pyarrow("reading parquet")
    try:
        meta = pq.read_metadata(path)
        raw = json.loads((meta.metadata or {}).get(STAMP_KEY.encode(), b"null"))
        if not isinstance(raw, dict) or raw.get("version") != STAMP_VERSION:
            return None
        counts = raw.pop("written")
        raw.pop("version")
        if counts.get("rows") != meta.num_rows:
            counts["damaged"] = True  # not what was written: scored again
        return Stamp(**raw), counts
    except Exception:  # not a parquet file, or a stamp of another shape: not ours
        return None


class ShardFiles:
    """`-o DIR/`: one parquet per input shard, DIR/<shard name>.parquet, written atomically when the shard is
    finished, with its stamp and the run's provenance."""

    wants_meta = True
    FIELDS = record_fields("dataset")

    def __init__(self, folder: str, stamp: Stamp) -> None:
        self.folder = folder
        self.base = stamp  # the run's stamp, its shard fields filled per shard
        self.meta: dict | None = None
        self.written = 0

    def set_meta(self, meta: dict) -> None:
        self.meta = meta

    def path(self, shard: Shard) -> str:
        return os.path.join(self.folder, shard.stem + ".parquet")

    def stamp(self, shard: Shard) -> Stamp:
        size, mtime = shard_identity(shard.path) or (None, None)
        return replace(self.base, shard=os.path.abspath(shard.path), size=size, mtime_ns=mtime)

    def shard_done(self, shard: Shard, records: tuple[Record, ...], damaged: bool) -> None:
        counts = {"rows": len(records), "failed": sum(r.error is not None for r in records), "damaged": damaged}
        stamp = {**asdict(self.stamp(shard)), "version": STAMP_VERSION, "written": counts}
        metadata = {STAMP_KEY: json.dumps(stamp, ensure_ascii=False), **provenance_metadata(self.meta)}
        with signals_deferred():  # a stop signal now lands after the rename: never a half-written file
            write_parquet(self.path(shard), records_table(records, self.FIELDS), metadata)
        self.written += 1


def write_parquet(path: str, table: Any, metadata: dict[str, str], label: str = "-o") -> None:
    """A table written to path atomically (a temp file beside it, renamed), with key-value metadata."""
    import pyarrow.parquet as pq

    out = Output(path, label=label, binary=True)
    try:
        writer = pq.ParquetWriter(out.stream, table.schema)
        writer.write_table(table)
        writer.add_key_value_metadata(metadata)
        writer.close()
    except BaseException:
        out.discard()
        raise
    out.close()


@dataclass(frozen=True)
class Plan:
    """Which shards a run with `-o DIR/` scores, and how many it skips as done."""

    todo: list[Shard]
    skipped: int


def plan_shards(files: ShardFiles, shards: list[Shard], overwrite: bool) -> Plan:
    """Skip the shards whose output is there, complete and made the same way; refuse (a usage error, before the
    model loads) an output made another way unless `overwrite`, and any file there that pickrank did not write."""
    todo, changed = [], []
    for shard in shards:
        path = files.path(shard)
        if not os.path.lexists(path):
            todo.append(shard)
            continue
        found = read_stamp(path) if os.path.isfile(path) and not os.path.islink(path) else None
        if found is None:
            raise UsageError(f"-o {path}: a file pickrank did not write (no stamp): not overwritten")
        stamp, counts = found
        why = files.stamp(shard).differs(stamp)
        if why is None and not counts.get("damaged"):
            continue  # done
        if why is not None and not counts.get("damaged") and not overwrite:
            changed.append(f"{path} ({why} changed)")
        todo.append(shard)  # not read to its end last time (a damaged shard may have been fixed since), or changed
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise UsageError(f"-o: scored another way: {'; '.join(changed[:3])}{more}; give --overwrite to score "
                         "them again")
    return Plan(todo, len(shards) - len(todo))


def check_output_folder(folder: str, shards: list[Shard]) -> None:
    """The -o folder exists (made now if only it is missing), and no two shards would share an output name, nor
    an output be one of the input shards."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise OutputError(f"-o {folder}: cannot make the folder: {e.strerror or e}") from None
    names: dict[str, str] = {}
    for shard in shards:
        other = names.setdefault(shard.stem, shard.path)
        if other != shard.path:
            raise UsageError(f"-o {folder}: the shards {other} and {shard.path} would both write {shard.stem}"
                             ".parquet: score them in separate runs")
        out = os.path.join(folder, shard.stem + ".parquet")
        if os.path.exists(shard.path) and os.path.exists(out) and os.path.samefile(out, shard.path):
            raise UsageError(f"-o {out}: is also an input ({shard.path}); it would be overwritten")


def is_output_folder(path: str | None) -> bool:
    """Whether -o names a folder (an existing one, or a name ending in /): one output per input shard."""
    return bool(path) and path != "-" and (path.endswith(("/", os.sep)) or os.path.isdir(path))  # type: ignore[union-attr]

