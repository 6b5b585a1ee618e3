"""Copies of the winners (--copy-to): each into a name not taken yet, never overwriting, never half-written."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace

from pickrank.errors import OutputError
from pickrank.output.targets import may_write
from pickrank.records import Record

log = logging.getLogger("pickrank")


def check_copy_to(dest: str) -> None:
    """--copy-to must be a folder this user may write (made if missing); checked before the model loads."""
    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise OutputError(f"--copy-to {dest}: not a folder")
    try:
        os.makedirs(dest, exist_ok=True)
        st = os.stat(dest)
    except OSError as e:
        raise OutputError(f"--copy-to {dest}: cannot create the folder: {e.strerror or e}") from None
    if not may_write(dest, st):
        raise OutputError(f"--copy-to {dest}: the folder is not writable")


def group_folder(dest: str, group: str | None) -> str:
    """Where a record's copy goes: dest/GROUP/ for a best-of-n group (made if missing), so that winners keep the
    group they came from and two groups' cand0.png never meet; dest itself for other records."""
    if not group:
        return dest
    parts = [p for p in group.replace(os.sep, "/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts or os.path.isabs(group):  # never a path out of dest
        raise OSError(f"group {group!r} is not a folder name")
    folder = os.path.join(dest, *parts)
    for i in range(1, len(parts) + 1):
        sub = os.path.join(dest, *parts[:i])
        if os.path.islink(sub):  # not ours to write through
            raise OSError(f"{sub} is a symbolic link")
        os.makedirs(sub, exist_ok=True)
    return folder


def copy_winners(records: tuple[Record, ...], dest: str) -> tuple[tuple[Record, ...], int]:
    """Copy each scored record's image into dest (a best-of-n group's into dest/GROUP/) under a name not taken yet
    (never overwriting).

    A copy that fails becomes that record's error (its score stays); returns the records and how many failed.
    """
    out = []
    failed = 0
    for r in records:
        if r.error is not None or r.path is None:
            out.append(r)
            continue
        try:
            out.append(replace(r, copied_to=copy_one(r.path, group_folder(dest, r.group))))
        except OSError as e:
            reason = f"not copied to {dest}: {e.strerror or e}"
            log.warning("%s: %s", r.path, reason)
            out.append(replace(r, error=reason))
            failed += 1
    return tuple(out), failed


def copy_one(path: str, dest: str) -> str:
    """Copy path into dest as NAME, NAME-1, ... (the first free one); a failed copy leaves no partial file."""
    stem, ext = os.path.splitext(os.path.basename(path))
    with open(path, "rb") as fin:
        n = 0
        while True:
            target = os.path.join(dest, f"{stem}{ext}" if n == 0 else f"{stem}-{n}{ext}")
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                n += 1
        try:
            with os.fdopen(fd, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        except BaseException:
            os.unlink(target)  # ours (O_EXCL): a half copy is not left behind
            raise
    try:
        shutil.copystat(path, target)
    except OSError:
        pass  # times and mode are a nicety; the copy itself is whole
    return target
