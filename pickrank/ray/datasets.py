"""`--engine ray` on a dataset: the shards are read on Ray Data, one read task per shard, each running the local
reader (`inputs.datasets.sets.shard_samples`: the same guards, the same error records, nothing extracted), and the
driver takes the samples back in shard order to hash them, ask the cache and hand the misses to the embedding
actors (`ray.engine`).

Ray Data's own `read_webdataset` and `read_parquet` are not used: they follow no guard of ours (unsafe members,
--max-bytes before a member is read, damage as an error record naming the offset), and their records would differ
from the local engine's. A dataset of shard numbers mapped by a generator that runs our reader is the datasource:
rows leave a task in blocks of at most ROWS_PER_BLOCK samples, so a shard is never whole in memory.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

from pickrank.inputs.datasets.paths import Shard
from pickrank.inputs.datasets.samples import Sample
from pickrank.inputs.datasets.sets import Reading, shard_samples
from pickrank.ray.cluster import join_or_start, require_ray

# Samples in one block a read task yields, and the bytes of images after which it yields earlier.
ROWS_PER_BLOCK = 64
BLOCK_MAX_BYTES = 64 << 20
_FIELDS = ("key", "where", "image", "caption", "uid", "error")


def _table(shard: int, samples: list[Sample], damage: str | None = None) -> Any:
    """A block: one row per sample (and a last row with the shard's damage, if any), typed columns."""
    import pyarrow as pa

    rows = [{f: getattr(s, f) for f in _FIELDS} for s in samples]
    if damage is not None:
        rows.append({"key": None, "where": "", "image": None, "caption": None, "uid": None, "error": None})
    schema = pa.schema([("shard", pa.int64()), ("key", pa.string()), ("where", pa.string()), ("image", pa.binary()),
                        ("caption", pa.string()), ("uid", pa.string()), ("error", pa.string()),
                        ("damage", pa.string())])
    return pa.Table.from_pylist([{"shard": shard, **r, "damage": damage if damage is not None and i == len(rows) - 1
                                  else None} for i, r in enumerate(rows)], schema=schema)


def read_shards(batch: dict, shards: list[Shard], reading: Reading) -> Iterator[Any]:
    """The read task: each shard number of the batch read with the local reader, yielded block by block."""
    for number in batch["shard"]:
        i = int(number)
        damage: list[str] = []
        block: list[Sample] = []
        size = 0
        for s in shard_samples(shards[i], reading, damage):
            block.append(s)
            size += len(s.image or b"")
            if len(block) >= ROWS_PER_BLOCK or size >= BLOCK_MAX_BYTES:
                yield _table(i, block)
                block, size = [], 0
        if block or damage:
            yield _table(i, block, damage[0] if damage else None)


class RayShards:
    """The shards of a run read on Ray Data; `samples(shard, reading, damage)` is `shard_samples`'s stand-in on the
    driver, called for each shard in the order given. Ray is joined (or started) in the constructor, on the calling
    thread (ray.init sets signal handlers), and stopped by `close` when this started it."""

    def __init__(self, shards: list[Shard], reading: Reading, address: str | None) -> None:
        self.ray = require_ray()
        self.shards = {id(s): i for i, s in enumerate(shards)}
        self.started = join_or_start(address)
        if self.started:
            logging.getLogger("ray.data").setLevel(logging.ERROR)
        ctx = self.ray.data.DataContext.get_current()
        self.saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, False  # rows in shard order
        self.rows: Iterator[dict] = iter(())
        self.ahead: dict | None = None  # the first row of the next shard, taken while ending the one before
        try:
            self.rows = self._rows(self.ray.data.from_items(
                [{"shard": i} for i in range(len(shards))], override_num_blocks=max(1, len(shards))
            ).map_batches(read_shards, batch_size=1, batch_format="numpy",
                          fn_kwargs={"shards": shards, "reading": reading}))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _rows(ds: Any) -> Iterator[dict]:
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            yield from table.to_pylist()

    def samples(self, shard: Shard, reading: Reading, damage: list[str]) -> Iterator[Sample]:
        """The shard's samples as its read task read them; its damage, if any, appended to `damage`."""
        number = self.shards[id(shard)]
        while True:
            row = self.ahead if self.ahead is not None else next(self.rows, None)
            self.ahead = None
            if row is None or row["shard"] > number:
                self.ahead = row
                return
            if row["damage"] is not None:
                damage.append(row["damage"])
                continue
            yield Sample(**{f: row[f] for f in _FIELDS})

    def close(self) -> None:
        """Stop reading; put Ray Data's settings back; stop Ray when this started it."""
        close = getattr(self.rows, "close", None)
        if close is not None:
            close()
        ctx = self.ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = self.saved
        if self.started:
            try:
                self.ray.shutdown()
            except Exception:
                pass
