"""Discover image paths lazily from files, folders, glob patterns and stdin."""

from __future__ import annotations

import glob
import os
import sys
from typing import Iterable, Iterator, TextIO

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
_GLOB_CHARS = set("*?[")


def is_image_name(name: str) -> bool:
    """True when the file name has an image extension (case-insensitive); the file is not opened."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_glob(arg: str) -> bool:
    """True when arg is a glob pattern for pickrank to expand."""
    return any(c in _GLOB_CHARS for c in arg)


def first_visit(seen: set[tuple[int, int]], st: os.stat_result) -> bool:
    """True the first time a folder (by device and inode) is met: symlinked folders are followed once, and a
    symlink loop or a folder linked twice ends there."""
    ident = (st.st_dev, st.st_ino)
    if ident in seen:
        return False
    seen.add(ident)
    return True


def walk_images(folder: str) -> Iterator[str]:
    """Image files under folder, recursively, in sorted order; symlinked folders followed once (no loops).

    A folder that cannot be listed (no permission, gone meanwhile) is yielded itself, in its place: reading it
    then fails with the reason, so it is reported like an unreadable file instead of vanishing.
    """
    seen: set[tuple[int, int]] = set()

    def visit(d: str) -> Iterator[str]:
        try:
            st = os.stat(d)
        except OSError:
            yield d
            return
        if not first_visit(seen, st):
            return
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            yield d
            return
        subdirs = []
        for e in entries:
            # Only the name is looked at for files, so folders full of other files cost no reads.
            if is_image_name(e.name):
                yield e.path
            else:
                try:
                    if e.is_dir():
                        subdirs.append(e.path)
                except OSError:
                    pass
        for sd in subdirs:
            yield from visit(sd)

    yield from visit(folder)


def peek(paths: Iterator[str]) -> tuple[str | None, Iterator[str]]:
    """The first path (or None) and an iterator that still yields it, so discovery stays lazy."""
    for first in paths:
        def chain() -> Iterator[str]:
            yield first
            yield from paths
        return first, chain()
    return None, iter(())


def _stdin_paths(stdin: TextIO) -> Iterator[str]:
    for line in stdin:
        line = line.rstrip("\r\n")
        if line.strip():
            yield line


def expand(args: Iterable[str], stdin: TextIO | None = None) -> Iterator[str]:
    """Expand PATH arguments (file, folder, glob, '-') into image paths, lazily, each path once.

    A file named explicitly is yielded whatever its extension, so a non-image shows up as an error
    record rather than vanishing; a missing path is yielded too, for the same reason.
    """
    seen: set[str] = set()

    def once(p: str) -> Iterator[str]:
        key = os.path.normcase(os.path.abspath(p))
        if key not in seen:
            seen.add(key)
            yield p

    def one(arg: str, from_glob: bool = False) -> Iterator[str]:
        if os.path.isdir(arg) and not is_image_name(arg):
            for p in walk_images(arg):
                yield from once(p)
        elif not from_glob or is_image_name(arg):
            yield from once(arg)

    for arg in args:
        if arg == "-":
            for p in _stdin_paths(stdin or sys.stdin):
                yield from one(p)
        elif not os.path.lexists(arg) and is_glob(arg):
            for p in sorted(glob.iglob(arg, recursive=True)):
                yield from one(p, from_glob=True)
        else:
            yield from one(arg)
