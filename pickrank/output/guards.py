"""Output safety for a run, before the model loads: no two outputs in one place, none over an input (named now, or
discovered later: inputs are guarded as they are read)."""

from __future__ import annotations

import glob
import logging
import os
import stat
import sys
from dataclasses import replace
from typing import Iterable, Iterator, Sequence

from pickrank.errors import UsageError
from pickrank.inputs.datasets.paths import dataset_kind, expand_braces, is_dataset_arg
from pickrank.inputs.discover import is_glob, is_image_name
from pickrank.output.targets import Target, resolve_output
from pickrank.records import CandidateSet, Item

log = logging.getLogger("pickrank")


class InputIsOutput(UsageError):
    """An output would be written over one of the run's inputs: nothing at all is written (exit 2)."""


def stdout_target() -> Target | None:
    """Where results go without -o, as a Target (None when stdout has no descriptor, as under a test)."""
    try:
        fd = sys.stdout.fileno()
        os.fstat(fd)
    except (AttributeError, OSError, ValueError):  # ValueError, OSError: io.UnsupportedOperation, a closed fd
        return None
    return Target("fd", "stdout", fd=fd)


def check_outputs(outputs: list[tuple[str, str | None]], inputs: Sequence[str]) -> dict[tuple[int, int], str]:
    """No two outputs in one place, and no output over a named input (usage errors, before the model loads).

    Returns the outputs that are existing files, by (device, inode) -> "OPTION PATH", for `guard_inputs` to
    check the inputs discovered later (globs, stdin, CSV cells) against.
    """
    targets = []
    for label, path in outputs:
        if label == "-o" and path in (None, "-"):
            target = stdout_target()
            if target is not None:
                targets.append(("stdout", target))
        elif path is not None:  # (--html - is a file named '-', as before)
            targets.append((f"{label} {path}", resolve_output(path, label)))
    for i, (a, ta) in enumerate(targets):
        for b, tb in targets[i + 1:]:
            if ta.identity() == tb.identity() and not ta.harmless_to_share:
                raise UsageError(f"{a} and {b} are the same file: give each output its own")
    files = {}
    for name, t in targets:
        if t.kind == "file" and t.st is not None:
            check_not_an_input(name, t.path, t.st, inputs)
            files[(t.st.st_dev, t.st.st_ino)] = name
    return files


def check_not_an_input(name: str, real: str, st: os.stat_result, inputs: Sequence[str]) -> None:
    """An existing output file must not be a named input, nor an image or dataset shard inside a named input
    folder. Dataset shards are named by brace ranges and globs too: those are expanded here, as their samples are
    read in memory where `guard_inputs` sees no path."""
    for given in inputs:
        if given == "-":
            continue
        for arg in _dataset_names(given):
            try:
                ast = os.stat(arg)
            except OSError:  # an image glob, or missing: checked as paths are read (guard_inputs)
                continue
            if stat.S_ISDIR(ast.st_mode):
                folder = os.path.realpath(arg)
                what = "an image" if is_image_name(real) else "a dataset shard" if dataset_kind(real) else None
                if what and os.path.commonpath([real, folder]) == folder:
                    raise InputIsOutput(f"{name}: is {what} in the input folder {arg}; it would be overwritten")
            elif os.path.samestat(ast, st):
                raise InputIsOutput(f"{name}: is also an input ({arg}); it would be overwritten")


def _dataset_names(arg: str) -> Iterator[str]:
    """The argument itself, or the shards its brace range or dataset glob names."""
    if not is_dataset_arg(arg):
        yield arg
        return
    for name in expand_braces(arg):
        yield from (sorted(glob.iglob(name, recursive=True)) if is_glob(name) and not os.path.lexists(name)
                    else (name,))


def guard_inputs(sets: list[CandidateSet], files: dict[tuple[int, int], str]) -> list[CandidateSet]:
    """Sets whose paths stop the run (usage error, nothing written) at an input that is also an output file.

    Costs one stat per input path, and only when an output file already exists.
    """
    if not files:
        return sets

    def guarded(paths: Iterable[Item]) -> Iterator[Item]:
        for p in paths:
            if not isinstance(p, str):  # a shard's sample in memory: its shard was checked as an input
                yield p
                continue
            try:
                st = os.stat(p)
            except OSError:  # reported as the image's error when it is read
                yield p
                continue
            if (st.st_dev, st.st_ino) in files:
                raise InputIsOutput(f"{files[(st.st_dev, st.st_ino)]}: is also an input ({p}); "
                                     "it would be overwritten")
            yield p

    return [s if s.error is not None else replace(s, paths=guarded(s.paths)) for s in sets]


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one existing file (symlinks and hard links included)."""
    try:
        return os.path.samestat(os.stat(a), os.stat(b))
    except OSError:
        return False
