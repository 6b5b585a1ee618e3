"""Parquet outputs (`-f parquet`, `-o x.parquet`): the record columns with their types, written in row groups, and
the run's provenance in the file's key-value metadata. pyarrow comes with `pickrank[eval]`."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from pickrank.errors import UsageError
from pickrank.inputs.datasets.parquet import require_pyarrow
from pickrank.output.sinks import SinkBase
from pickrank.output.targets import Output, resolve_output
from pickrank.records import Record

if TYPE_CHECKING:
    import pyarrow as pa

# The key-value metadata key under which a parquet output holds the run's provenance (JSON).
PROVENANCE_KEY = "pickrank.provenance"
# The typed record columns; every other record column is text.
_TYPES = {"score": "float64", "prob": "float64", "rank": "int64", "truncated": "bool_"}


def record_schema(fields: Sequence[str]) -> pa.Schema:
    """The arrow schema of records with these columns."""
    import pyarrow as pa

    return pa.schema([(f, getattr(pa, _TYPES.get(f, "string"))()) for f in fields])


def records_table(records: Iterable[Record], fields: Sequence[str], schema: pa.Schema | None = None) -> pa.Table:
    """Records as an arrow table of these columns."""
    import pyarrow as pa

    schema = schema or record_schema(fields)
    rows = [r.to_dict(tuple(fields)) for r in records]
    return pa.table({f: pa.array([row[f] for row in rows], type=schema.field(f).type) for f in fields},
                    schema=schema)


def check_parquet_output(path: str | None) -> None:
    """-f parquet goes to a file (its footer is written last and points back): a usage error for stdout, a device
    or a FIFO; pyarrow missing is a usage error naming the extra."""
    require_pyarrow("-f parquet")
    if path is None or path == "-" or resolve_output(path).kind != "file":
        raise UsageError("-f parquet writes a file: give -o FILE.parquet")


def provenance_metadata(meta: dict | None) -> dict[str, str]:
    """The key-value metadata that holds a run's provenance (none before the model has loaded)."""
    return {} if meta is None else {PROVENANCE_KEY: json.dumps(meta, ensure_ascii=False)}


class ParquetWriter(SinkBase):
    """A record writer (as `writers.Writer`'s) into a parquet file: a row group each ROWS_PER_GROUP records, the
    provenance in the footer at close, the file renamed into place then (a discarded run leaves none)."""

    ROWS_PER_GROUP = 65536
    wants_meta = True

    def __init__(self, out: Output, fields: tuple[str, ...]) -> None:
        self.out, self.fields = out, fields
        pq = require_pyarrow("-f parquet")
        self.schema = record_schema(fields)
        self.rows: list[Record] = []
        self.meta: dict | None = None
        self.writer: Any = pq.ParquetWriter(out.stream, self.schema)

    def set_meta(self, meta: dict) -> None:
        self.meta = meta

    def write(self, records: Iterable[Record]) -> None:
        self.rows.extend(records)
        if len(self.rows) >= self.ROWS_PER_GROUP:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            self.writer.write_table(records_table(self.rows, self.fields, self.schema))
            self.rows = []

    def close(self) -> None:
        self._flush()
        self.writer.add_key_value_metadata(provenance_metadata(self.meta))
        self.writer.close()
        self.out.close()

    def describe(self) -> str:
        return self.out.describe()

    def discard(self) -> None:
        try:
            self.writer.close()
        finally:
            self.out.discard()
