"""Where an output really goes, decided before anything is written: stdout; a regular file, written to a temp file
beside it and renamed into place; or a device, FIFO or /dev/stdout-style path, written straight through."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import IO

from pickrank.errors import OutputError

# How long an output FIFO with no reader is waited for before the run gives up.
FIFO_WAIT_S = 10.0
# /proc/self/fd/N, /proc/PID/fd/N, /proc/PID/task/TID/fd/N (what /dev/stdout and /dev/fd/N resolve to).
_FD_PATH = re.compile(r"/proc/(?:self|thread-self|(\d+))(?:/task/\d+)?/fd/(\d+)")
log = logging.getLogger("pickrank")


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
    """A text destination (binary with `binary`): stdout; a file, written to a temp file renamed into place on
    close; or a device, FIFO or /dev/stdout-style path, written straight through."""

    def __init__(self, path: str | None, label: str = "-o", binary: bool = False) -> None:
        self.path = path
        self.label = label  # how messages name the option that gave the path
        self._tmp: str | None = None
        self._direct = False  # a stream opened here and written straight through: closed, never renamed
        self.target: Target | None = None
        if path is None or path == "-":
            self.stream: IO = sys.stdout.buffer if binary else sys.stdout
            self.path = None
            return
        self.target = resolve_output(path, label)
        if self.target.kind == "file":
            fd, self._tmp = _temp_beside(self.target.path, path, label)
        else:
            fd = os.dup(self.target.fd) if self.target.kind == "fd" else _open_stream(path, label)
            self._direct = True
        self.stream = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="")

    def describe(self) -> str:
        """How messages name it: "-o out.csv", "--meta m.json", or "stdout"."""
        return f"{self.label} {self.path}" if self.path else "stdout"

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

    def abandon(self) -> None:
        """Nothing written: as discard."""
        self.discard()

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
