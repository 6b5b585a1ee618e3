"""The label file: pairwise labels as JSON Lines in the format `pickrank eval` reads (`prompt`, `image_0`, `image_1`,
`label` 0/1/0.5, image paths relative to the file), plus who labelled (`labeler`), when (`time`), how the pair was
chosen (`chosen_by`), an `id`, and the systems of a compare layout (`system_0`, `system_1`).

Every label is one line appended and flushed to disk at once, under an exclusive lock, so that several labellers
(processes) can label into one file and a crash loses at most the label in flight. Undo removes the labeller's own
line, found by its id, in place under the same lock. A file that holds anything but labels is never written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import IO, Iterator

from pickrank.errors import UsageError

log = logging.getLogger("pickrank")

TIE = 0.5
REQUIRED = ("prompt", "image_0", "image_1", "label")
UNKNOWN_LABELER = "unknown"


@dataclass(frozen=True)
class Label:
    """One labelled pair: image paths absolute in memory (relative to the file's folder on disk)."""

    prompt: str
    image_0: str
    image_1: str
    label: float  # 0: image_0 preferred, 1: image_1, 0.5: a tie
    labeler: str = UNKNOWN_LABELER
    time: str | None = None
    chosen_by: str | None = None  # "uncertain" or "random" (`pickrank label`); None: made elsewhere
    id: str | None = None
    system_0: str | None = None
    system_1: str | None = None

    def key(self) -> tuple[str, frozenset[str]]:
        """The pair, whichever image is first: its prompt and its two files' real paths."""
        return pair_key(self.prompt, self.image_0, self.image_1)


def pair_key(prompt: str, a: str, b: str) -> tuple[str, frozenset[str]]:
    """What makes two labels the same pair: the prompt, and both files (by real path), in either order."""
    return prompt, frozenset((os.path.realpath(a), os.path.realpath(b)))


def new_label(prompt: str, image_0: str, image_1: str, label: float, **extra: str | None) -> Label:
    """A label made now: a fresh id and the time in UTC."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return Label(prompt, image_0, image_1, label, time=now, id=uuid.uuid4().hex, **extra)  # type: ignore[arg-type]


def _relative(path: str, folder: str) -> str:
    """`path` relative to the label file's folder (as `pickrank eval` resolves it), absolute across drives."""
    try:
        return os.path.relpath(path, folder)
    except ValueError:
        return os.path.abspath(path)


def to_line(label: Label, folder: str) -> str:
    """The label as one JSON line, image paths relative to `folder`; fields without a value are left out."""
    d = {k: v for k, v in asdict(label).items() if v is not None}
    d["image_0"], d["image_1"] = _relative(label.image_0, folder), _relative(label.image_1, folder)
    return json.dumps(d, ensure_ascii=False) + "\n"


def parse_line(line: str, folder: str, where: str) -> Label:
    """A label from one line of a label file (paths resolved against `folder`); UsageError naming `where`."""
    try:
        row = json.loads(line)
    except ValueError as e:
        raise UsageError(f"{where}: not JSON: {e}") from None
    if not isinstance(row, dict) or any(k not in row for k in REQUIRED):
        raise UsageError(f"{where}: not a label (needs {', '.join(REQUIRED)})")
    label = row["label"]
    if label not in (0, 1, TIE) or isinstance(label, bool):
        raise UsageError(f"{where}: label {label!r} is not 0, 1 or 0.5")
    images = [row["image_0"], row["image_1"]]
    if not all(isinstance(p, str) and p.strip() for p in images) or not isinstance(row["prompt"], str) \
            or not row["prompt"].strip():
        raise UsageError(f"{where}: a label needs a prompt and two image paths")
    paths = [os.path.join(folder, os.path.expanduser(p)) for p in images]
    text = {k: str(row[k]) if row.get(k) is not None else None
            for k in ("time", "chosen_by", "id", "system_0", "system_1")}
    return Label(row["prompt"], os.path.normpath(paths[0]), os.path.normpath(paths[1]), float(label),
                 labeler=str(row.get("labeler") or UNKNOWN_LABELER), **text)  # type: ignore[arg-type]


def read_labels(path: str) -> list[Label]:
    """Every label of a file, in order; a torn last line (a label in flight when a run stopped) is left out."""
    from pickrank.inputs.textfile import read_utf8

    folder = os.path.dirname(os.path.abspath(path))
    text = read_utf8(path)
    lines = text.splitlines()
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if n == len(lines) and not text.endswith("\n") and _is_torn(line):
            log.warning("%s:%d: a torn last line (a label in flight when labelling stopped): left out", path, n)
            continue
        out.append(parse_line(line, folder, f"{path}:{n}"))
    return out


def _is_torn(line: str) -> bool:
    try:
        json.loads(line)
        return False
    except ValueError:
        return True


@contextlib.contextmanager
def _locked(f: IO[bytes]) -> Iterator[None]:
    """An exclusive lock on the open file for the block (advisory, between pickrank processes; none where the
    platform has no fcntl)."""
    try:
        import fcntl
    except ImportError:  # Windows: one labeller per file
        yield
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class LabelFile:
    """A label file being written: `append` one label (flushed and synced before it returns), `remove` one by id.

    Opening checks that an existing file holds labels only (or is empty) and drops a torn last line."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.folder = os.path.dirname(os.path.abspath(path))
        if os.path.lexists(path) and not os.path.isfile(path):
            raise UsageError(f"--labels {path}: not a regular file")
        self.existing = read_labels(path) if os.path.exists(path) else []  # UsageError: not a label file
        with self._open() as f, _locked(f):
            self._drop_torn_tail(f)

    def _open(self) -> IO[bytes]:
        try:
            return open(self.path, "a+b")
        except OSError as e:
            raise UsageError(f"--labels {self.path}: cannot write: {e.strerror or e}") from None

    def _drop_torn_tail(self, f: IO[bytes]) -> None:
        f.seek(0)
        data = f.read()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            f.truncate(cut)

    def append(self, label: Label) -> None:
        """One line at the end of the file, on disk before this returns."""
        line = to_line(label, self.folder).encode("utf-8")
        with self._open() as f, _locked(f):
            f.seek(0, os.SEEK_END)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def remove(self, label_id: str) -> bool:
        """Take out the line of the label with this id (undo), whoever wrote after it; False when it is not there."""
        with open(self.path, "r+b") as f, _locked(f):
            data = f.read()
            start = 0
            for line in data.splitlines(keepends=True):
                if _line_id(line) == label_id:
                    rest = data[start + len(line):]
                    f.seek(start)
                    f.write(rest)
                    f.truncate(start + len(rest))
                    f.flush()
                    os.fsync(f.fileno())
                    return True
                start += len(line)
        return False


def _line_id(line: bytes) -> str | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row.get("id") if isinstance(row, dict) else None


__all__ = ["TIE", "Label", "pair_key", "new_label", "to_line", "parse_line", "read_labels", "LabelFile"]
