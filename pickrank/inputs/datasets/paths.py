"""Dataset PATH arguments: webdataset shards (.tar) and parquet files named one by one, by a quoted glob, by a brace
range (`'shards/{00000..00999}.tar'`, the webdataset convention) or by a folder holding them."""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

from pickrank.errors import NoImages, UsageError
from pickrank.inputs.discover import is_glob, walk_images

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
PARQUET_SUFFIX = ".parquet"
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
# A brace range longer than this is a typo, not a dataset (and would fill memory with names).
MAX_BRACE_NAMES = 10_000_000


@dataclass(frozen=True)
class Shard:
    """One input file of a dataset run: a webdataset tar or a parquet file."""

    path: str
    kind: str  # "tar" or "parquet"

    @property
    def stem(self) -> str:
        """The file's name without its dataset suffix: what names its per-shard output (00042.tar -> 00042)."""
        name = os.path.basename(self.path)
        for suffix in (*TAR_SUFFIXES, PARQUET_SUFFIX):
            if name.lower().endswith(suffix):
                return name[:-len(suffix)]
        return name


def dataset_kind(name: str) -> str | None:
    """"tar" or "parquet" when the name has a dataset suffix (case-insensitive), else None."""
    lower = name.lower()
    if lower.endswith(TAR_SUFFIXES):
        return "tar"
    return "parquet" if lower.endswith(PARQUET_SUFFIX) else None


def _brace_names(inner: str) -> list[str] | None:
    """The names one brace group stands for: a range `a..b` (zero padding kept) or a list `x,y`; None: neither."""
    m = _RANGE.fullmatch(inner)
    if m:
        a, b = int(m.group(1)), int(m.group(2))
        if abs(b - a) >= MAX_BRACE_NAMES:
            raise UsageError(f"{{{inner}}}: a range of more than {MAX_BRACE_NAMES:,} names")
        width = len(m.group(1)) if m.group(1).lstrip("-").startswith("0") else 0
        step = 1 if b >= a else -1
        return [str(i).zfill(width) for i in range(a, b + step, step)]
    return inner.split(",") if "," in inner else None


def expand_braces(pattern: str) -> Iterator[str]:
    """Every name a pattern's brace groups stand for, in order (`a{0..2}` -> a0 a1 a2; `{x,y}.tar` -> x.tar y.tar);
    text in braces that is neither a range nor a list stays as written."""
    for m in _BRACE.finditer(pattern):
        names = _brace_names(m.group(1))
        if names is not None:
            head, tail = pattern[:m.start()], pattern[m.end():]
            for name in names:
                yield from expand_braces(head + name + tail)
            return
    yield pattern


def _folder_shards(folder: str) -> list[str]:
    """The dataset files under a folder, recursively, sorted: its tars; without any, its parquet files (an
    img2dataset folder keeps a metadata parquet beside each tar)."""
    found: dict[str, list[str]] = {"tar": [], "parquet": []}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            kind = dataset_kind(name)
            if kind is not None and not name.startswith("."):  # temp files of a run writing there
                found[kind].append(os.path.join(dirpath, name))
    return found["tar"] or found["parquet"]


def _is_shard_folder(arg: str) -> bool:
    """A folder holding dataset files and no image: what an img2dataset or Hugging Face download looks like."""
    if not os.path.isdir(arg) or not _folder_shards(arg):
        return False
    return next(walk_images(arg), None) is None


def is_dataset_arg(arg: str) -> bool:
    """Whether a PATH argument names dataset files (a shard, a pattern of them, or a folder of them)."""
    if arg == "-":
        return False
    return any(dataset_kind(name) is not None or _is_shard_folder(name) for name in expand_braces(arg))


def uses_datasets(args: Iterable[str]) -> bool:
    """Whether a run's PATH arguments are dataset files; a mix of datasets and images is a usage error."""
    kinds = {is_dataset_arg(a) for a in args}
    if kinds == {True, False}:
        raise UsageError("give image files and folders, or dataset shards (.tar, .parquet), not both in one run")
    return kinds == {True}


def find_shards(args: Iterable[str]) -> list[Shard]:
    """The shards the arguments name, in order, each once. A shard named outright that is missing stays in the
    list (reading it gives its error record); a glob or a folder that holds none is a usage error."""
    shards: dict[str, Shard] = {}
    for arg in args:
        for name in expand_braces(arg):
            if os.path.isdir(name):
                paths = _folder_shards(name)
            elif not os.path.lexists(name) and is_glob(name):
                paths = [p for p in sorted(glob.iglob(name, recursive=True)) if dataset_kind(p)]
            else:
                paths = [name]
            if not paths:
                raise NoImages(f"{name}: matches no .tar or .parquet file")
            for p in paths:
                kind = dataset_kind(p)
                if kind is None:
                    raise UsageError(f"{p}: not a dataset shard (.tar or .parquet)")
                shards.setdefault(os.path.normcase(os.path.abspath(p)), Shard(p, kind))
    if not shards:
        raise NoImages("no shards given")
    return list(shards.values())
