"""Write rankings as a table, JSON, JSON Lines, CSV or bare paths, streaming, to an `Output` (stdout, a file written
atomically, or a device/FIFO straight through)."""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import os
from typing import Iterable

from pickrank.errors import OutputError, UsageError
from pickrank.options import FORMATS, OutputOptions
from pickrank.output.sinks import Sink, SinkBase
from pickrank.output.targets import Output
from pickrank.records import Record

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# The format an output file's extension names when -f is not given (.txt: the plain list of paths).
EXTENSION_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".txt": "paths",
                     ".parquet": "parquet"}
log = logging.getLogger("pickrank")


def record_fields(kind: str, copy: bool = False) -> tuple[str, ...]:
    """Output columns for a command: batch adds id, best-of-n adds group (and copied_to with --copy-to); every
    command says where each record's prompt came from (prompt_source)."""
    if kind == "dataset":  # a sample is its key in its shard (and its uid when it has one), not a path
        return ("key", "uid", "shard", "prompt", "prompt_source", "score", "prob", "rank", "truncated", "error")
    lead = {"batch": ("id",), "best-of-n": ("group",)}.get(kind, ())
    tail = ("copied_to",) if copy else ()
    return lead + ("prompt", "prompt_source", "path", "score", "prob", "rank", "truncated", "error") + tail


def csv_safe(value: object) -> object:
    """Neutralise text a spreadsheet would run as a formula (OWASP CSV injection): prefix a quote."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def format_for_path(path: str | None) -> str | None:
    """The format an output file's extension names (.jsonl, .json, .csv, .txt, .parquet), or None (stdout, other
    names)."""
    if not path or path == "-":
        return None
    return EXTENSION_FORMATS.get(os.path.splitext(path)[1].lower())


def check_extension(path: str | None) -> None:
    """An -o name whose extension pickrank does not know is a usage error (without -f), never a silent JSON Lines
    file; a name without one (a device, a FIFO, `results`) is JSON Lines, as is stdout."""
    ext = os.path.splitext(os.path.basename(path or ""))[1].lower()
    if ext and path != "-" and ext not in EXTENSION_FORMATS:
        known = ", ".join(EXTENSION_FORMATS)
        raise UsageError(f"-o {path}: pickrank does not know the extension {ext} ({known}): name the format with -f")

class Writer(SinkBase):
    """Base writer (a `Sink`): `write(records)` for each finished ranking, then `close()`."""

    def __init__(self, out: Output, fields: tuple[str, ...]) -> None:
        self.out = out
        self.fields = fields

    def describe(self) -> str:
        return self.out.describe()

    def write(self, records: Iterable[Record]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.out.close()

    def discard(self) -> None:
        """Give up: a file target is left as it was before the run (stdout is just flushed)."""
        if self.out.path is None:
            self.out.stream.flush()
        else:
            self.out.discard()


class JsonlWriter(Writer):
    """One JSON object per line, flushed after each ranking so that pipes see results as they complete."""

    def write(self, records: Iterable[Record]) -> None:
        # One write per ranking: an interrupt lands between rankings, never inside a line.
        self.out.stream.write("".join(json.dumps(r.to_dict(self.fields), ensure_ascii=False) + "\n"
                                      for r in records))
        self.out.stream.flush()


class JsonWriter(Writer):
    """One JSON array, streamed element by element; always closed, so an interrupted run is still valid JSON."""

    tail = "\n"  # after the array's "]"
    eager = True  # the "[" goes out at once (a reader sees the output begin)

    def __init__(self, out: Output, fields: tuple[str, ...]) -> None:
        super().__init__(out, fields)
        self.count = 0
        self.opened = False
        if self.eager:
            self._open()

    def _open(self) -> None:
        """Write what comes before the first element (once)."""
        if not self.opened:
            self.opened = True
            self.out.stream.write(self.head())

    def head(self) -> str:
        return "["

    def write(self, records: Iterable[Record]) -> None:
        self._open()
        items = [json.dumps(r.to_dict(self.fields), ensure_ascii=False) for r in records]
        if items:  # one write per ranking, so an interrupt never leaves half an element
            self.out.stream.write(("," if self.count else "") + "\n  " + ",\n  ".join(items))
            self.count += len(items)
        self.out.stream.flush()

    def close(self) -> None:
        self._open()
        self.out.stream.write(("\n]" if self.count else "]") + self.tail)
        super().close()


class JsonMetaWriter(JsonWriter):
    """-f json --with-meta: one object {"meta": provenance, "records": [...]}, the array streamed as JsonWriter's.
    The head waits for the first ranking or the close, by which time the CLI has handed over the provenance."""

    tail = "}\n"
    eager = False  # the head holds the provenance, known once the model has loaded
    meta: dict | None = None
    wants_meta = True

    def set_meta(self, meta: dict) -> None:
        self.meta = meta

    def head(self) -> str:
        return '{"meta": ' + json.dumps(self.meta, ensure_ascii=False) + ', "records": ['


class MetaWriter(SinkBase):
    """--meta FILE: the run's provenance as one JSON object, written (temp file, then rename) when the run closes;
    a run that never had it (the model failed to load) leaves an earlier file as it was."""

    wants_meta = True

    def __init__(self, out: Output) -> None:
        self.out = out
        self.meta: dict | None = None

    def describe(self) -> str:
        return self.out.describe()

    def write(self, records: Iterable[Record]) -> None:
        """Records are not its business."""

    def set_meta(self, meta: dict) -> None:
        self.meta = meta

    def close(self) -> None:
        if self.meta is None:
            self.out.discard()
            return
        self.out.stream.write(json.dumps(self.meta, ensure_ascii=False, indent=2) + "\n")
        self.out.close()

    def discard(self) -> None:
        self.out.discard()


class CsvWriter(Writer):
    """CSV with a header; text cells that look like formulas are escaped."""

    def __init__(self, out: Output, fields: tuple[str, ...]) -> None:
        super().__init__(out, fields)
        self.csv = csv.writer(out.stream, lineterminator="\n")
        self.csv.writerow(fields)

    def write(self, records: Iterable[Record]) -> None:
        rows = []
        for r in records:
            d = r.to_dict(self.fields)
            rows.append(["" if d[k] is None else csv_safe(d[k]) for k in self.fields])
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        self.out.stream.write(buf.getvalue())  # one write per ranking: rows are never cut by an interrupt
        self.out.stream.flush()


class PathsWriter(Writer):
    """Only the scored images' paths, one per line for xargs (NUL-terminated with null, for xargs -0); errors are
    left out."""

    def __init__(self, out: Output, fields: tuple[str, ...], null: bool = False) -> None:
        super().__init__(out, fields)
        self.end = "\0" if null else "\n"
        self.warned = False

    def write(self, records: Iterable[Record]) -> None:
        for r in records:
            if r.error is None and r.path is not None:
                if self.end == "\n" and "\n" in r.path and not self.warned:
                    log.warning("%r has a newline in its name, which breaks one-path-a-line output: use -0 "
                                "(and xargs -0)", r.path)
                    self.warned = True
                self.out.stream.write(r.path + self.end)
        self.out.stream.flush()


class TableWriter(Writer):
    """A rich table per ranking, for people at a terminal."""

    def __init__(self, out: Output, fields: tuple[str, ...]) -> None:
        super().__init__(out, fields)
        from rich.console import Console

        self.console = Console(file=out.stream, force_terminal=out.is_terminal or None,
                               width=None if out.is_terminal else 120)
        self.console.on_broken_pipe = _closed_pipe  # rich's own answer is SystemExit(1)

    def write(self, records: Iterable[Record]) -> None:
        for _, group in itertools.groupby(records, key=lambda r: (r.prompt, r.id, r.group)):
            self._table(list(group))

    def _table(self, records: list[Record]) -> None:
        from rich.markup import escape as markup_escape
        from rich.table import Table

        from pickrank.output.terminal import print_titled, terminal_safe

        def escape(text: str) -> str:  # neither rich markup nor terminal control sequences in names and prompts
            return markup_escape(terminal_safe(text))

        first = records[0]
        title = first.prompt or ""
        if first.group:
            title = f"[{first.group}] {title}"
        elif first.id and "id" in self.fields:
            title = f"[{first.id}] {title}"
        title = title if len(title) < 200 else title[:197] + "..."
        if first.prompt_source not in (None, "option", "csv"):  # a prompt the user did not type: say whence
            title = f"{title}  (prompt from {first.prompt_source})"
        table = Table()
        for name, justify in (("rank", "right"), ("score", "right"), ("prob", "right"), ("path", "left")):
            table.add_column(name, justify=justify, overflow="fold")
        for r in records:
            if r.error:
                table.add_row("-", "-", "-", escape(f"{r.path}  (error: {r.error})"))
            else:
                table.add_row(str(r.rank), f"{r.score:.3f}", f"{r.prob:.3f}", escape(r.path or ""))
        print_titled(self.console, title, table)


def _closed_pipe() -> None:
    """A closed pipe (`| head -1`): raised again, so that the CLI ends quietly with exit 0 as for every format."""
    raise BrokenPipeError


def make_writer(fmt: str, out: Output, fields: tuple[str, ...], null: bool = False,
                with_meta: bool = False) -> Sink:
    """The writer for a --format name; null (-0) ends each path with NUL and goes only with paths; with_meta wraps
    -f json's array with the provenance (`outputs.choose_format` refuses it with the other formats)."""
    from pickrank.output.parquet import ParquetWriter  # here: pyarrow is optional

    classes = {"json": JsonMetaWriter if with_meta else JsonWriter, "jsonl": JsonlWriter, "csv": CsvWriter,
               "paths": PathsWriter, "table": TableWriter, "parquet": ParquetWriter}
    if fmt not in classes:
        raise OutputError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "paths":
        return PathsWriter(out, fields, null=null)
    if null:
        raise UsageError(f"-0/--null goes with -f paths only, not -f {fmt}")
    return classes[fmt](out, fields)


def choose_format(o: OutputOptions) -> str | None:
    """-f; else paths for -0; else what the -o file's extension names; None: table on a terminal, else jsonl."""
    fmt = o.format.value if o.format is not None else None
    if o.null and fmt not in (None, "paths"):
        raise UsageError(f"-0/--null goes with -f paths only, not -f {fmt}")
    if fmt is None and not o.null:
        check_extension(o.output)
    fmt = fmt or ("paths" if o.null else format_for_path(o.output))
    if o.with_meta and fmt != "json":  # CSV, JSON Lines and the others stay pure records
        raise UsageError(f"--with-meta wraps -f json's array, not -f {fmt or 'jsonl/table'}: give -f json, or "
                         "--meta FILE to write the provenance beside any format")
    return fmt
