"""Write rankings as a table, JSON, JSON Lines, CSV or bare paths, streaming, to stdout or atomically to a file."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import sys
import tempfile
from typing import IO, Iterable

from .errors import OutputError
from .records import Record

FORMATS = ("table", "json", "jsonl", "csv", "paths")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def record_fields(kind: str, copy: bool = False) -> tuple[str, ...]:
    """Output columns for a command: batch adds id, best-of-n adds group (and copied_to with --copy-to)."""
    lead = {"batch": ("id",), "best-of-n": ("group",)}.get(kind, ())
    tail = ("copied_to",) if copy else ()
    return lead + ("prompt", "path", "score", "prob", "rank", "truncated", "error") + tail


def csv_safe(value: object) -> object:
    """Neutralise text a spreadsheet would run as a formula (OWASP CSV injection): prefix a quote."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


class Output:
    """A text destination: stdout, or a file written to a temp file and renamed into place on close."""

    def __init__(self, path: str | None, label: str = "-o") -> None:
        self.path = path
        self.label = label  # how messages name the option that gave the path
        self._tmp: str | None = None
        if path is None or path == "-":
            self.stream: IO[str] = sys.stdout
            self.path = None
            return
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise OutputError(f"{label} {path}: is a folder")
        try:
            fd, self._tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        except FileNotFoundError:
            raise OutputError(f"{label} {path}: folder {folder} does not exist") from None
        except OSError as e:
            raise OutputError(f"{label} {path}: cannot write there: {e.strerror or e}") from None
        self.stream = os.fdopen(fd, "w", encoding="utf-8", newline="")

    @property
    def is_terminal(self) -> bool:
        return self.path is None and hasattr(self.stream, "isatty") and self.stream.isatty()

    def close(self) -> None:
        """Finish: flush stdout, or move the temp file onto the target (whatever was written is whole)."""
        if self._tmp is None:
            self.stream.flush()
            return
        try:
            self.stream.flush()
            os.fsync(self.stream.fileno())
            self.stream.close()
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self._tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are ordinary files
            os.replace(self._tmp, self.path)  # type: ignore[arg-type]
        except OSError as e:
            raise OutputError(f"{self.label} {self.path}: {e.strerror or e}") from None
        finally:
            if self._tmp and os.path.exists(self._tmp):
                os.unlink(self._tmp)
            self._tmp = None

    def discard(self) -> None:
        """Remove the temp file without touching the target."""
        if self._tmp is not None:
            try:
                self.stream.close()
            finally:
                if os.path.exists(self._tmp):
                    os.unlink(self._tmp)
                self._tmp = None


class Writer:
    """Base writer: `write(records)` for each finished ranking, then `close()`."""

    def __init__(self, out: Output, fields: tuple[str, ...]) -> None:
        self.out = out
        self.fields = fields

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

    def __init__(self, out: Output, fields: tuple[str, ...]) -> None:
        super().__init__(out, fields)
        self.count = 0
        self.out.stream.write("[")

    def write(self, records: Iterable[Record]) -> None:
        items = [json.dumps(r.to_dict(self.fields), ensure_ascii=False) for r in records]
        if items:  # one write per ranking, so an interrupt never leaves half an element
            self.out.stream.write(("," if self.count else "") + "\n  " + ",\n  ".join(items))
            self.count += len(items)
        self.out.stream.flush()

    def close(self) -> None:
        self.out.stream.write("\n]\n" if self.count else "]\n")
        super().close()


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
    """Only the scored images' paths, one per line (for xargs); errors are left out."""

    def write(self, records: Iterable[Record]) -> None:
        for r in records:
            if r.error is None and r.path is not None:
                self.out.stream.write(r.path + "\n")
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
        from rich.markup import escape
        from rich.table import Table

        first = records[0]
        title = first.prompt or ""
        if first.group:
            title = f"[{first.group}] {title}"
        elif first.id and "id" in self.fields:
            title = f"[{first.id}] {title}"
        table = Table(title=escape(title if len(title) < 200 else title[:197] + "..."), title_justify="left")
        for name, justify in (("rank", "right"), ("score", "right"), ("prob", "right"), ("path", "left")):
            table.add_column(name, justify=justify, overflow="fold")
        for r in records:
            if r.error:
                table.add_row("-", "-", "-", escape(f"{r.path}  (error: {r.error})"))
            else:
                table.add_row(str(r.rank), f"{r.score:.3f}", f"{r.prob:.3f}", escape(r.path or ""))
        self.console.print(table)


def _closed_pipe() -> None:
    """A closed pipe (`| head -1`): raised again, so that the CLI ends quietly with exit 0 as for every format."""
    raise BrokenPipeError


def make_writer(fmt: str, out: Output, fields: tuple[str, ...]) -> Writer:
    """The writer for a --format name; table falls back to jsonl when stdout is not a terminal."""
    classes = {"json": JsonWriter, "jsonl": JsonlWriter, "csv": CsvWriter, "paths": PathsWriter,
               "table": TableWriter}
    if fmt not in classes:
        raise OutputError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    return classes[fmt](out, fields)
