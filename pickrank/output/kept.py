"""What `pickrank filter` writes of the kept samples: their keys as parquet, and DataComp's uids.npy; each file
written atomically when the filter has finished (a failed or interrupted filter leaves an earlier one as it was)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from pickrank.errors import UsageError
from pickrank.inputs.datasets.samples import uid_halves
from pickrank.output.parquet import provenance_metadata
from pickrank.output.targets import Output

if TYPE_CHECKING:
    import pyarrow as pa

# DataComp's subset format: a sorted structured array of 128-bit uids, upper and lower 64-bit halves. The field
# names are numpy's defaults, as DataComp's resharder checks `dtype == np.dtype("u8,u8")`.
UID_DTYPE = np.dtype("u8,u8")
KEPT_COLUMNS = ("key", "uid", "shard", "prompt", "score")
FILTER_KEY = "pickrank.filter"


class KeptKeys:
    """-o FILE.parquet: the kept samples (key, uid, shard, prompt, score), the selection and the scores'
    provenance in its key-value metadata."""

    def __init__(self, path: str, provenance: dict | None) -> None:
        import pyarrow.parquet as pq

        from pickrank.output.parquet import record_schema

        self.out = Output(path, binary=True)
        self.schema = record_schema(KEPT_COLUMNS)
        self.provenance = provenance
        self.writer: Any = pq.ParquetWriter(self.out.stream, self.schema)
        self.summary: dict | None = None

    def take(self, kept: pa.Table) -> None:
        self.writer.write_table(kept.select(list(KEPT_COLUMNS)).cast(self.schema))

    def finish(self, summary: dict) -> None:
        self.summary = summary

    def close(self) -> None:
        if self.summary is None:  # interrupted before the second pass ended: a partial list is no list
            self.discard()
            return
        self.writer.add_key_value_metadata({FILTER_KEY: json.dumps(self.summary),
                                            **provenance_metadata(self.provenance)})
        self.writer.close()
        self.out.close()

    def discard(self) -> None:
        try:
            self.writer.close()
        finally:
            self.out.discard()

    def abandon(self) -> None:
        self.discard()


class UidsFile:
    """--uids FILE.npy: the kept samples' 128-bit hex uids as DataComp's sorted `u8,u8` array (no pickle)."""

    def __init__(self, path: str) -> None:
        self.out = Output(path, label="--uids", binary=True)
        self.parts: list[np.ndarray] = []
        self.done = False

    def take(self, kept: pa.Table) -> None:
        uids = kept.column("uid").to_pylist()
        halves = [uid_halves(u) if isinstance(u, str) else None for u in uids]
        missing = sum(h is None for h in halves)
        if missing:
            keys = kept.column("key").to_pylist()
            first = next(k for k, h in zip(keys, halves) if h is None)
            raise UsageError(f"--uids: {missing} kept sample(s) have no 128-bit hex uid (the first: {first!r}); "
                             "DataComp's uids come from each sample's json member or a uid column")
        self.parts.append(np.array(halves, dtype=UID_DTYPE))

    def finish(self, summary: dict) -> None:
        self.done = True

    def close(self) -> None:
        if not self.done:
            self.discard()
            return
        uids = np.sort(np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=UID_DTYPE))
        np.save(self.out.stream, uids, allow_pickle=False)
        self.out.close()

    def discard(self) -> None:
        self.out.discard()

    def abandon(self) -> None:
        self.discard()
