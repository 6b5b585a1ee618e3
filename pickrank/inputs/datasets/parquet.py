"""Parquet files with the image bytes in a column (img2dataset's parquet output, Hugging Face datasets' `image`
struct, Pick-a-Pic's `jpg_0`): read with pyarrow, row group by row group, only the columns needed."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from pickrank.errors import UsageError
from pickrank.inputs.datasets.samples import Sample, ShardError
from pickrank.inputs.files import ReadError, TooLarge, check_size, open_regular
from pickrank.options import DatasetOptions

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

PYARROW_EXTRA = "pip install 'pickrank[eval]'"
# The usual names, tried in this order when no --*-column option is given.
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes")
CAPTION_COLUMNS = ("caption", "txt", "text", "prompt")
KEY_COLUMNS = ("key", "__key__", "id", "image_id", "uid")
UID_COLUMN = "uid"
# Rows turned into Python values at a time (a row group's columns are in memory already; its values are not).
ROWS_AT_A_TIME = 64


def require_pyarrow(what: str) -> Any:
    """pyarrow.parquet, or a usage error naming the extra that brings it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"{what} needs pyarrow: {PYARROW_EXTRA}") from None
    return pq


def image_value(value: object) -> bytes | None:
    """An image cell's bytes: a binary cell as it is, a struct (the datasets Image feature) by its `bytes`."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None


def _is_binary(t: pa.DataType) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or getattr(pa.types, "is_binary_view",
                                                                              lambda _t: False)(t)


def _is_image_type(t: pa.DataType) -> bool:
    """A binary column, or a struct with a binary `bytes` field."""
    import pyarrow as pa

    if pa.types.is_struct(t):
        return any(t.field(i).name == "bytes" and _is_binary(t.field(i).type) for i in range(t.num_fields))
    return _is_binary(t)


@dataclass(frozen=True)
class Layout:
    """Which columns of a parquet file hold a sample's image, caption, key and uid (None: not there)."""

    image: str
    caption: str | None
    key: str | None
    uid: str | None

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys(c for c in (self.image, self.caption, self.key, self.uid) if c))


def _image_column(schema: pa.Schema, chosen: str | None, path: str) -> str:
    """--image-column, checked; else the first usual name of an image type, else the only binary column."""
    if chosen is not None:
        if chosen not in schema.names:
            raise UsageError(f"{path}: no column {chosen!r} (--image-column; columns: {', '.join(schema.names)})")
        if not _is_image_type(schema.field(chosen).type):
            raise UsageError(f"{path}: column {chosen!r} holds {schema.field(chosen).type}, not image bytes")
        return chosen
    usual = [n for n in IMAGE_COLUMNS if n in schema.names and _is_image_type(schema.field(n).type)]
    if usual:
        return usual[0]
    binary = [f.name for f in schema if _is_image_type(f.type)]
    if len(binary) == 1:
        return binary[0]
    if binary:
        raise UsageError(f"{path}: several columns hold bytes ({', '.join(binary)}): choose one with --image-column")
    raise UsageError(f"{path}: no column holds image bytes (columns: {', '.join(schema.names)}); a parquet of "
                     "metadata only has nothing to score")


def _named_column(schema: pa.Schema, chosen: str | None, usual: tuple[str, ...], option: str,
                  path: str) -> str | None:
    """A text column: the option's, checked, else the first usual name present (None when there is none)."""
    if chosen is not None:
        if chosen not in schema.names:
            raise UsageError(f"{path}: no column {chosen!r} ({option}; columns: {', '.join(schema.names)})")
        return chosen
    return next((n for n in usual if n in schema.names), None)


def layout(schema: pa.Schema, options: DatasetOptions, need_caption: bool, path: str) -> Layout:
    """The columns to read from a file of this schema; a missing image column, or under --prompt-from caption a
    missing caption column, is a usage error (before the model loads)."""
    image = _image_column(schema, options.image_column, path)
    caption = _named_column(schema, options.caption_column, CAPTION_COLUMNS, "--caption-column", path)
    if need_caption and caption is None:
        raise UsageError(f"{path}: no caption column ({', '.join(CAPTION_COLUMNS)}): name it with --caption-column, "
                         "or give --prompt")
    key = _named_column(schema, options.key_column, KEY_COLUMNS, "--key-column", path)
    return Layout(image, caption, key, UID_COLUMN if UID_COLUMN in schema.names else None)


@contextlib.contextmanager
def open_parquet(path: str) -> Iterator[pq.ParquetFile]:
    """The file open for reading row groups (its footer read), or ShardError when it is not a parquet file."""
    pq = require_pyarrow("reading parquet")
    try:
        f = open_regular(path)
    except ReadError as e:
        raise ShardError(str(e)) from None
    with f:
        try:
            # pre_buffer (pyarrow's default) would keep every row group read so far in memory.
            pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=1 << 20)
        except Exception as e:  # pyarrow's ArrowInvalid and friends: whatever it is, it is not a parquet file
            raise ShardError(f"not a readable parquet file ({e})") from None
        yield pf


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _row_sample(cells: dict[str, Any], lay: Layout, row: int, max_bytes: int | None) -> Sample:
    key = _text(cells[lay.key]) if lay.key else str(row)
    where = f"row {row}"
    image = image_value(cells[lay.image])
    try:
        check_size(len(image) if image is not None else 0, max_bytes)
    except TooLarge as e:
        return Sample(key, where, error=str(e))
    caption = _text(cells[lay.caption]) if lay.caption else None
    return Sample(key, where, image, caption.strip() if caption else caption, _text(cells[lay.uid]) if lay.uid
                  else None)


def parquet_samples(pf: pq.ParquetFile, lay: Layout, max_bytes: int | None) -> Iterator[Sample]:
    """The file's rows as samples, one row group in memory at a time; a row group that fails to read is one
    unusable sample naming it, and the next one is read."""
    row = 0
    for g in range(pf.metadata.num_row_groups):
        rows = pf.metadata.row_group(g).num_rows
        try:
            table = pf.read_row_group(g, columns=lay.columns)
        except Exception as e:  # a corrupt page, a bad encoding: pyarrow's own errors
            yield Sample(None, f"row group {g} (rows {row}-{row + rows - 1})", error=f"row group {g} unreadable: {e}")
            row += rows
            continue
        for start in range(0, table.num_rows, ROWS_AT_A_TIME):
            part = table.slice(start, ROWS_AT_A_TIME)
            cols = {c: part.column(c).to_pylist() for c in lay.columns}
            for i in range(part.num_rows):
                yield _row_sample({c: v[i] for c, v in cols.items()}, lay, row, max_bytes)
                row += 1
        del table
