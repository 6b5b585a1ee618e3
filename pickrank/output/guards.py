"""Output safety for a run: outputs checked before the model loads (none over an input, none twice), inputs
guarded as they are discovered, results written and winners copied without overwriting anything.

The CLI calls these; nothing here prints (problems are exceptions, warnings go to the "pickrank" logger).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import sys
from typing import Callable, Sequence

from pickrank.errors import OutputError, UsageError
from pickrank.options import OutputOptions

log = logging.getLogger("pickrank")


class InputIsOutput(UsageError):
    """An output would be written over one of the run's inputs: nothing at all is written (exit 2)."""


class MetaHandOver:
    """Hands the run's provenance to the sinks that carry it (those with `set_meta`), once: computed only when one
    does (the weight hashes cost a read of the weights the first time), and only from a model that loaded."""

    def __init__(self, sinks: list, embedder, compute: Callable[[], dict]) -> None:
        self.takers = [s for s in sinks if hasattr(s, "set_meta")]
        self.embedder, self.compute = embedder, compute
        self.done = not self.takers

    def give(self) -> None:
        """Compute the provenance and hand it over (waits for the model; a failed load raises its error)."""
        if not self.done:
            meta = self.compute()
            for sink in self.takers:
                sink.set_meta(meta)
            self.done = True

    def give_if_loaded(self) -> None:
        """For a run that is failing or interrupted: hand it over if the model has loaded, never raising (the page
        of an interrupted run still says which model ran; the run's own error is the one reported)."""
        if self.done or not self.embedder.ready or self.embedder.error() is not None:
            return
        try:
            self.give()
        except Exception as e:  # the run's own error or interrupt matters more
            log.warning("provenance left out: %s", e)


def choose_format(o: OutputOptions) -> str | None:
    """-f; else paths for -0; else what the -o file's extension names; None: table on a terminal, else jsonl."""
    from pickrank.output.writers import format_for_path

    fmt = o.format.value if o.format is not None else None
    if o.null and fmt not in (None, "paths"):
        raise UsageError(f"-0/--null goes with -f paths only, not -f {fmt}")
    fmt = fmt or ("paths" if o.null else format_for_path(o.output))
    if o.with_meta and fmt != "json":  # CSV, JSON Lines and the others stay pure records
        raise UsageError(f"--with-meta wraps -f json's array, not -f {fmt or 'jsonl/table'}: give -f json, or "
                         "--meta FILE to write the provenance beside any format")
    return fmt


def stdout_target():
    """Where results go without -o, as a writers.Target (None when stdout has no descriptor, as under a test)."""
    from pickrank.output.writers import Target

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
    from pickrank.output.writers import resolve_output

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
    """An existing output file must not be a named input, nor an image inside a named input folder."""
    from pickrank.inputs.discover import is_image_name

    for arg in inputs:
        if arg == "-":
            continue
        try:
            ast = os.stat(arg)
        except OSError:  # a glob, or missing: checked as paths are read (guard_inputs)
            continue
        if stat.S_ISDIR(ast.st_mode):
            folder = os.path.realpath(arg)
            if is_image_name(real) and os.path.commonpath([real, folder]) == folder:
                raise InputIsOutput(f"{name}: is an image in the input folder {arg}; it would be overwritten")
        elif os.path.samestat(ast, st):
            raise InputIsOutput(f"{name}: is also an input ({arg}); it would be overwritten")


def guard_inputs(sets: list, files: dict[tuple[int, int], str]) -> list:
    """Sets whose paths stop the run (usage error, nothing written) at an input that is also an output file.

    Costs one stat per input path, and only when an output file already exists.
    """
    if not files:
        return sets
    from dataclasses import replace

    def guarded(paths):
        for p in paths:
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


def abandon(sinks: list) -> None:
    """Write no output at all: temp files removed, the HTML page not rendered."""
    for sink in sinks:
        try:
            (sink.abandon if hasattr(sink, "abandon") else sink.discard)()
        except Exception:
            pass  # clean-up of a run that is already failing
    sinks.clear()


def check_copy_to(dest: str) -> None:
    """--copy-to must be a folder this user may write (made if missing); checked before the model loads."""
    from pickrank.output.writers import may_write

    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise OutputError(f"--copy-to {dest}: not a folder")
    try:
        os.makedirs(dest, exist_ok=True)
        st = os.stat(dest)
    except OSError as e:
        raise OutputError(f"--copy-to {dest}: cannot create the folder: {e.strerror or e}") from None
    if not may_write(dest, st):
        raise OutputError(f"--copy-to {dest}: the folder is not writable")


def write_ranking(sink, records: tuple) -> None:
    """Hand a ranking to a sink; a failed write (a full disk, /dev/full) is an output error naming the output."""
    try:
        sink.write(records)
    except BrokenPipeError:
        raise  # the reader went away: a quiet stop (the CLI's exit code 0)
    except OSError as e:
        out = getattr(sink, "out", None)
        where = f"{out.label} {out.path}" if out is not None and out.path else "stdout"
        raise OutputError(f"{where}: {e.strerror or e}") from None


def copy_winners(records: tuple, dest: str) -> tuple[tuple, int]:
    """Copy each scored record's image into dest under a name not taken yet (never overwriting).

    A copy that fails becomes that record's error (its score stays); returns the records and how many failed.
    """
    from dataclasses import replace

    from pickrank.core.engine import with_copied

    out = []
    failed = 0
    for r in records:
        if r.error is not None or r.path is None:
            out.append(r)
            continue
        try:
            out.append(with_copied(r, copy_one(r.path, dest)))
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


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one existing file (symlinks and hard links included)."""
    try:
        return os.path.samestat(os.stat(a), os.stat(b))
    except OSError:
        return False
