"""Write rankings as a table, JSON, JSON Lines, CSV or bare paths, streaming: to stdout, atomically to a file, or
straight through to a device, FIFO or /dev/stdout-style path."""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import itertools
import json
import logging
import os
import re
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import IO, Iterable

from pickrank.errors import OutputError, UsageError
from pickrank.options import FORMATS
from pickrank.records import Record

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# The format an output file's extension names when -f is not given (.txt: the plain list of paths).
EXTENSION_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".txt": "paths"}
# How long an output FIFO with no reader is waited for before the run gives up.
FIFO_WAIT_S = 10.0
# /proc/self/fd/N, /proc/PID/fd/N, /proc/PID/task/TID/fd/N (what /dev/stdout and /dev/fd/N resolve to).
_FD_PATH = re.compile(r"/proc/(?:self|thread-self|(\d+))(?:/task/\d+)?/fd/(\d+)")

log = logging.getLogger("pickrank")


def record_fields(kind: str, copy: bool = False) -> tuple[str, ...]:
    """Output columns for a command: batch adds id, best-of-n adds group (and copied_to with --copy-to); every
    command says where each record's prompt came from (prompt_source)."""
    lead = {"batch": ("id",), "best-of-n": ("group",)}.get(kind, ())
    tail = ("copied_to",) if copy else ()
    return lead + ("prompt", "prompt_source", "path", "score", "prob", "rank", "truncated", "error") + tail


def csv_safe(value: object) -> object:
    """Neutralise text a spreadsheet would run as a formula (OWASP CSV injection): prefix a quote."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def format_for_path(path: str | None) -> str | None:
    """The format an output file's extension names (.jsonl, .json, .csv, .txt), or None (stdout, other names)."""
    if not path or path == "-":
        return None
    return EXTENSION_FORMATS.get(os.path.splitext(path)[1].lower())


def may_write(path: str, st: os.stat_result) -> bool:
    """Whether this user may write an existing file or folder; root too only where a write bit is set."""
    effective = os.access in os.supports_effective_ids
    if not os.access(path, os.W_OK, effective_ids=effective):
        return False
    # root may write anything: a file or folder without any write bit is still read-only to pickrank
    return os.geteuid() != 0 or bool(st.st_mode & 0o222)


@dataclass(frozen=True)
class Target:
    """Where an output really goes, found before anything is written.

    kind "file": a regular file (or none yet) at `path`, symlinks resolved: written to a temp file beside it and
    renamed onto it. kind "stream": a character device or FIFO, written straight through. kind "fd": one of this
    process's open descriptors (/dev/stdout, /dev/fd/N), written through a duplicate of it.
    """

    kind: str
    path: str
    st: os.stat_result | None = None
    fd: int | None = None

    def identity(self) -> tuple:
        """What two outputs share when they are the same place: (device, inode), or the real path of a new file."""
        if self.kind == "fd":
            st = os.fstat(self.fd)  # type: ignore[arg-type]
        else:
            st = self.st
        return ("path", self.path) if st is None else ("inode", st.st_dev, st.st_ino)

    @property
    def harmless_to_share(self) -> bool:
        """A character device (/dev/null, a terminal) may take two outputs; a file or a pipe may not."""
        if self.kind == "fd":
            return stat.S_ISCHR(os.fstat(self.fd).st_mode)  # type: ignore[arg-type]
        return self.st is not None and stat.S_ISCHR(self.st.st_mode)


def _own_fd(path: str, label: str) -> int | None:
    """The descriptor when path names one of this process's open files (/dev/stdout, /dev/fd/1, or a link to one).

    Links are followed one at a time, so a link to /dev/stdout is recognised before /proc turns it into
    'pipe:[...]' or the file the shell opened (which must be appended to as the shell set up, not replaced).
    """
    p = os.path.abspath(path)
    try:
        for _ in range(40):  # as the kernel's limit on links in a row
            p = os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))
            m = _FD_PATH.fullmatch(p)
            if m and (m.group(1) is None or int(m.group(1)) == os.getpid()):
                fd = int(m.group(2))
                break
            if not os.path.islink(p):
                return None
            p = os.path.join(os.path.dirname(p), os.readlink(p))
        else:
            return None
    except OSError:
        return None
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        raise OutputError(f"{label} {path}: descriptor {fd} is not open") from None
    if flags & os.O_ACCMODE == os.O_RDONLY:
        raise OutputError(f"{label} {path}: descriptor {fd} is open for reading only")
    return fd


def resolve_output(path: str, label: str = "-o") -> Target:
    """Decide where an output path leads and whether it may be written; raises OutputError (exit 1) if not.

    Nothing is created or opened (a FIFO's reader would see an early end of file).
    """
    fd = _own_fd(path, label)
    if fd is not None:
        return Target("fd", path, fd=fd)
    try:
        st: os.stat_result | None = os.stat(path)  # follows symlinks: a link is judged by what it points to
    except FileNotFoundError:
        st = None  # nothing there, or a dangling link: the file is created (where the link points)
    except OSError as e:
        raise OutputError(f"{label} {path}: {e.strerror or e}") from None
    if st is None or stat.S_ISREG(st.st_mode):
        real = os.path.realpath(path)  # a symlink stays; the file it points to gets the results
        folder = os.path.dirname(real)
        if not os.path.isdir(folder):
            raise OutputError(f"{label} {path}: folder {folder} does not exist")
        if st is not None and not may_write(real, st):
            raise OutputError(f"{label} {path}: the file is read-only (mode {stat.S_IMODE(st.st_mode):04o}); "
                              "not overwritten")
        return Target("file", real, st=st)
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{label} {path}: is a folder")
    if stat.S_ISBLK(st.st_mode):
        raise OutputError(f"{label} {path}: is a block device; results are not written over a disk")
    if stat.S_ISSOCK(st.st_mode):
        raise OutputError(f"{label} {path}: is a socket; give a file, a FIFO or -")
    if not may_write(path, st):  # a character device or a FIFO
        raise OutputError(f"{label} {path}: permission denied")
    return Target("stream", path, st=st)


def check_output(path: str, label: str = "-o") -> Target:
    """Fail early (before the model loads) when the output could not be written; creates nothing that stays."""
    target = resolve_output(path, label)
    if target.kind == "file":
        os.unlink(_temp_beside(target.path, path, label)[1])  # the folder takes new files
    return target


def _temp_beside(real: str, path: str, label: str) -> tuple[int, str]:
    """A temp file in the target's own folder, so that the final rename stays on one filesystem."""
    folder = os.path.dirname(real)
    try:
        return tempfile.mkstemp(prefix=f".{os.path.basename(real)}.", suffix=".tmp", dir=folder)
    except FileNotFoundError:
        raise OutputError(f"{label} {path}: folder {folder} does not exist") from None
    except OSError as e:
        raise OutputError(f"{label} {path}: cannot write there: {e.strerror or e}") from None


def _open_stream(path: str, label: str) -> int:
    """Open a character device or FIFO for writing, straight through; a FIFO waits FIFO_WAIT_S for a reader.

    A FIFO is opened non-blocking and retried while it has no reader (ENXIO): unlike a blocking open, the wait
    can end (a clear error instead of hanging for ever) and Ctrl-C stops it. Writes then block as usual.
    """
    flags = os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK  # never created, never truncated
    deadline = time.monotonic() + FIFO_WAIT_S
    waiting = False
    while True:
        try:
            fd = os.open(path, flags)
            break
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise OutputError(f"{label} {path}: {e.strerror or e}") from None
        if time.monotonic() >= deadline:
            raise OutputError(f"{label} {path}: no process is reading this FIFO (waited {FIFO_WAIT_S:g} s)")
        if not waiting:
            log.info("%s %s: waiting for a process to read this FIFO", label, path)
            waiting = True
        time.sleep(0.05)
    os.set_blocking(fd, True)
    return fd


class Output:
    """A text destination: stdout; a file, written to a temp file renamed into place on close; or a device,
    FIFO or /dev/stdout-style path, written straight through."""

    def __init__(self, path: str | None, label: str = "-o") -> None:
        self.path = path
        self.label = label  # how messages name the option that gave the path
        self._tmp: str | None = None
        self._direct = False  # a stream opened here and written straight through: closed, never renamed
        self.target: Target | None = None
        if path is None or path == "-":
            self.stream: IO[str] = sys.stdout
            self.path = None
            return
        self.target = resolve_output(path, label)
        if self.target.kind == "file":
            fd, self._tmp = _temp_beside(self.target.path, path, label)
        else:
            fd = os.dup(self.target.fd) if self.target.kind == "fd" else _open_stream(path, label)
            self._direct = True
        self.stream = os.fdopen(fd, "w", encoding="utf-8", newline="")

    @property
    def is_terminal(self) -> bool:
        return self.path is None and hasattr(self.stream, "isatty") and self.stream.isatty()

    def close(self) -> None:
        """Finish: flush stdout or a device, or move the temp file onto the target (whatever was written is whole)."""
        if self._direct:
            self._direct = False
            try:
                self.stream.close()
            except BrokenPipeError:
                raise  # the reader went away: a quiet end, as on stdout
            except OSError as e:
                raise OutputError(f"{self.label} {self.path}: {e.strerror or e}") from None
            return
        if self._tmp is None:
            self.stream.flush()
            return
        try:
            self.stream.flush()
            os.fsync(self.stream.fileno())
            self.stream.close()
            self._settle(self._tmp)
            os.replace(self._tmp, self.target.path)  # type: ignore[union-attr]
        except OSError as e:
            raise OutputError(f"{self.label} {self.path}: {e.strerror or e}") from None
        finally:
            if self._tmp and os.path.exists(self._tmp):
                os.unlink(self._tmp)
            self._tmp = None

    def _settle(self, tmp: str) -> None:
        """Give the temp file the replaced file's owner and permission bits (a new file: 0666 less the umask)."""
        try:
            st: os.stat_result | None = os.stat(self.target.path)  # type: ignore[union-attr]
        except OSError:
            st = self.target.st  # type: ignore[union-attr]
        if st is None:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are ordinary files
            return
        if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
            try:
                os.chown(tmp, st.st_uid, st.st_gid)  # possible as root (or for the group): the file stays theirs
            except OSError:
                pass
        os.chmod(tmp, stat.S_IMODE(st.st_mode))

    def discard(self) -> None:
        """Remove the temp file without touching the target (a device or FIFO is just closed)."""
        if self._direct:
            self._direct = False
            try:
                self.stream.close()
            except OSError:
                pass  # what could not be flushed is given up with the rest
            return
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

    def set_meta(self, meta: dict) -> None:
        self.meta = meta

    def head(self) -> str:
        return '{"meta": ' + json.dumps(self.meta, ensure_ascii=False) + ', "records": ['


class MetaWriter:
    """--meta FILE: the run's provenance as one JSON object, written (temp file, then rename) when the run closes;
    a run that never had it (the model failed to load) leaves an earlier file as it was."""

    def __init__(self, out: Output) -> None:
        self.out = out
        self.meta: dict | None = None

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

        from pickrank.output.terminal import terminal_safe

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
        table = Table(title=escape(title), title_justify="left")
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


def make_writer(fmt: str, out: Output, fields: tuple[str, ...], null: bool = False,
                with_meta: bool = False) -> Writer:
    """The writer for a --format name; null (-0) ends each path with NUL and goes only with paths; with_meta wraps
    -f json's array with the provenance (`outputs.choose_format` refuses it with the other formats)."""
    classes = {"json": JsonMetaWriter if with_meta else JsonWriter, "jsonl": JsonlWriter, "csv": CsvWriter,
               "paths": PathsWriter, "table": TableWriter}
    if fmt not in classes:
        raise OutputError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "paths":
        return PathsWriter(out, fields, null=null)
    if null:
        raise UsageError(f"-0/--null goes with -f paths only, not -f {fmt}")
    return classes[fmt](out, fields)
