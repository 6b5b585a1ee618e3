"""Turn each command's input (paths, a best-of-n folder, a prompts CSV) into candidate sets."""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import replace
from typing import Iterator, TextIO

from pickrank.errors import InvalidText, NoImages, UsageError
from pickrank.inputs.datasets.items import (
    NamedSample,
    dataset_shards,
    expand_items,
    named_samples,
    refuse_shards,
    shard_items,
)
from pickrank.inputs.datasets.paths import is_dataset_arg
from pickrank.inputs.decode import DEFAULT_MAX_PIXELS
from pickrank.inputs.discover import expand, first_visit, is_glob, is_image_name, peek
from pickrank.inputs.files import DEFAULT_MAX_BYTES
from pickrank.inputs.metadata import FoundPrompt, prompt_from_image
from pickrank.inputs.textfile import check_text, read_utf8
from pickrank.options import DatasetOptions
from pickrank.records import CandidateSet, Item, Query

log = logging.getLogger("pickrank")


def sets_for_score(prompt: str | None, args: list[str], stdin: TextIO | None = None,
                   max_pixels: int | None = DEFAULT_MAX_PIXELS, max_bytes: int | None = DEFAULT_MAX_BYTES
                   ) -> list[CandidateSet]:
    """`pickrank score` and `PickScorer.rank`: one prompt over every image the arguments name; without one, each
    image's own metadata prompt (`metadata_sets`)."""
    if prompt is None:
        return metadata_sets(args, stdin, max_pixels, max_bytes)
    check_prompt(prompt)
    check_named_paths(args)
    first, paths = peek(expand(args, stdin))
    if first is None:
        raise NoImages(f"no images found in {' '.join(args) or 'stdin'}")
    return [CandidateSet(queries=(Query(prompt=prompt, prompt_source="option"),), paths=paths)]


def metadata_sets(args: list[str], stdin: TextIO | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                  max_bytes: int | None = DEFAULT_MAX_BYTES) -> list[CandidateSet]:
    """Every image the arguments name, scored against the prompt in its own metadata: images with the same prompt
    form one ranking (in the order their prompts first appear), and an image without one is an error record naming
    why. Each image's metadata is read once, all of it before scoring (headers only: no pixel is decoded). When
    no image has a prompt, that is a usage error at once: the model would load for nothing."""
    check_named_paths(args)
    paths = list(expand(args, stdin))
    if not paths:
        raise NoImages(f"no images found in {' '.join(args) or 'stdin'}")
    by_prompt: dict[str, tuple[str | None, list[str]]] = {}  # prompt -> (source of its first image, images)
    order: list[tuple[str, str] | str] = []  # (path, why it has no prompt) in its place, or the prompt there
    for path in paths:
        found = prompt_from_image(path, max_pixels, max_bytes)
        if found.prompt is None:
            order.append((path, found.reason or "no generation metadata"))
        elif found.prompt in by_prompt:
            by_prompt[found.prompt][1].append(path)
        else:
            by_prompt[found.prompt] = (found.source, [path])
            order.append(found.prompt)
    if not by_prompt:
        path, reason = order[0]  # type: ignore[misc]
        raise UsageError(f"no prompt: none of the {len(paths)} image(s) has one in its metadata "
                         f"({path}: {reason}); give --prompt TEXT")
    return [_no_prompt_set(*s) if isinstance(s, tuple) else
            CandidateSet(queries=(Query(prompt=s, prompt_source=by_prompt[s][0]),), paths=by_prompt[s][1])
            for s in order]


def _no_prompt_set(path: str, reason: str) -> CandidateSet:
    """The error record of an image without a metadata prompt (an unreadable one: its read error, as scoring says)."""
    unreadable = reason.startswith("unreadable: ")
    error = reason[len("unreadable: "):] if unreadable else f"no prompt: {reason} (give --prompt to score it)"
    log.warning("%s: %s", path, error)
    return CandidateSet(queries=(Query(prompt=""),), source=path, error=error)


def check_named_paths(args: list[str]) -> None:
    """A file or folder named on the command line that does not exist is a usage error at once (a typo), before
    the model loads; globs (which may match nothing), - (stdin) and dataset shards (a brace range, or a shard whose
    reading says it is missing) are left to discovery."""
    missing = [a for a in args if a != "-" and not is_glob(a) and not os.path.lexists(a) and not is_dataset_arg(a)]
    if missing:
        raise UsageError(f"no such file or folder: {', '.join(missing)}")


def check_prompt(prompt: str) -> None:
    """An empty prompt is a usage error: it would rank images by nothing; so is one that is not valid text
    (`textfile.check_text`: InvalidText)."""
    if not prompt or not prompt.strip():
        raise UsageError("the prompt is empty: give --prompt TEXT")
    check_text(prompt, "--prompt")


# -- best-of-n -------------------------------------------------------------------------------------------

def prompt_from_metadata(path: str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                         max_bytes: int | None = DEFAULT_MAX_BYTES) -> str | None:
    """The generation prompt stored in an image's metadata (`metadata.prompt_from_image`), or None.

    The file is opened as for scoring (regular files only, within max_bytes and max_pixels) and no pixel is
    decoded: a FIFO in the group cannot hang the run, nor a huge image fill memory.
    """
    return prompt_from_image(path, max_pixels, max_bytes).prompt


NO_PROMPT = "no prompt: give --prompt, add prompt.txt, or embed it in the image metadata"
SHARD_NO_PROMPT = "no prompt: give --prompt, or caption the samples"


def prompt_txt(folder: str) -> str | None:
    """The text of FOLDER/prompt.txt, stripped; None when there is none, it is empty or unreadable."""
    txt = os.path.join(folder, "prompt.txt")
    if not os.path.isfile(txt):
        return None
    try:
        with open(txt, encoding="utf-8-sig") as f:
            return f.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def find_group_prompt(folder: str, images: list[str], prompt: str | None, max_pixels: int | None,
                      max_bytes: int | None) -> FoundPrompt:
    """A best-of-n group's prompt and its source: --prompt (`option`), else prompt.txt, else the first image's
    metadata prompt that is found (its format); with none, the reason the first image has none."""
    if prompt:
        return FoundPrompt(prompt, "option")
    text = prompt_txt(folder)
    if text:
        try:
            return FoundPrompt(check_text(text, "prompt.txt"), "prompt.txt")
        except InvalidText as e:
            return FoundPrompt(None, "prompt.txt", str(e))
    first: FoundPrompt | None = None
    for path in images:
        found = prompt_from_image(path, max_pixels, max_bytes)
        if found.prompt:
            return found
        if first is None:
            first = replace(found, reason=f"{os.path.basename(path)}: {found.reason}")
    return first or FoundPrompt(None, None, "no images")


def group_prompt(folder: str, images: list[str], prompt: str | None, max_pixels: int | None,
                  max_bytes: int | None) -> str | None:
    """The group's prompt text only (see find_group_prompt)."""
    return find_group_prompt(folder, images, prompt, max_pixels, max_bytes).prompt


def _group_name(folder: str, dirpath: str) -> str:
    """A group's name: its path under FOLDER, or FOLDER's own name for the images directly in it."""
    group = os.path.relpath(dirpath, folder)
    return os.path.basename(os.path.abspath(folder)) if group == "." else group


def _unreadable_set(folder: str, e: OSError) -> CandidateSet:
    """An error record for a folder that cannot be listed, reported like an unreadable file."""
    path = e.filename if isinstance(e.filename, str) else folder
    reason = "cannot read folder: " + ("permission denied" if isinstance(e, PermissionError) else e.strerror or str(e))
    log.warning("%s: %s", path, reason)
    return CandidateSet(queries=(Query(prompt="", group=_group_name(folder, path)),), source=path, error=reason)


def sets_for_best_of_n(folder: str, prompt: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                       max_bytes: int | None = DEFAULT_MAX_BYTES, files_only: str | None = None,
                       options: DatasetOptions = DatasetOptions()) -> list[CandidateSet]:
    """`pickrank best-of-n`: images directly in FOLDER form one group; each subfolder with images is its own; when
    FOLDER names dataset shards, each shard is a group (`shard_groups`).

    max_pixels and max_bytes apply to the images whose metadata is read for a group's prompt, as when scoring.
    A folder that cannot be listed is an error record, in its place. files_only: the option that needs image files
    (--copy-to, --html), which refuses shards; options: where a shard sample's parts are.
    """
    if prompt is not None:
        check_prompt(prompt)
    if is_dataset_arg(folder):
        refuse_shards(folder, files_only)
        return _checked_groups(shard_groups(folder, prompt, max_bytes, options), folder)
    if not os.path.isdir(folder):
        raise UsageError(f"{folder}: not a folder")
    sets: list[CandidateSet] = []
    seen: set[tuple[int, int]] = set()
    unlisted: list[OSError] = []  # os.walk reports these as it meets them, between the folders it yields

    def report_unlisted() -> None:
        sets.extend(_unreadable_set(folder, e) for e in unlisted)
        unlisted.clear()

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unlisted.append, followlinks=True):
        report_unlisted()
        if not first_visit(seen, os.stat(dirpath)):
            dirnames[:] = []
            continue
        dirnames.sort()
        images = sorted(os.path.join(dirpath, f) for f in filenames if is_image_name(f))
        if not images:
            continue
        group = _group_name(folder, dirpath)
        found = find_group_prompt(dirpath, images, prompt, max_pixels, max_bytes)
        if found.prompt is None:
            error = f"{NO_PROMPT} ({found.reason})"
            log.warning("%s: %s", dirpath, error)
            query = Query(prompt="", group=group, prompt_source=found.source)  # a format without a prompt: named
            sets.append(CandidateSet(queries=(query,), source=dirpath, error=error))
        else:
            query = Query(prompt=found.prompt, group=group, prompt_source=found.source)
            sets.append(CandidateSet(queries=(query,), paths=images))
    report_unlisted()
    return _checked_groups(sets, folder)


def shard_groups(arg: str, prompt: str | None, max_bytes: int | None,
                 options: DatasetOptions = DatasetOptions()) -> list[CandidateSet]:
    """best-of-n over dataset shards: each shard is a group named by its file, scored against --prompt, else the
    first caption found in it (as a folder's group takes its first image's metadata prompt)."""
    plan, reading = dataset_shards([arg], max_bytes, options=options)
    sets = []
    for shard in plan[0]:  # type: ignore[union-attr]
        text, source = (prompt, "option") if prompt else (_first_caption(named_samples(shard, reading)), "caption")
        if text is None:
            error = f"{SHARD_NO_PROMPT} (no sample has a caption)"
            log.warning("%s: %s", shard.path, error)
            sets.append(CandidateSet(queries=(Query(prompt="", group=shard.stem),), source=shard.path,
                                     error=error))
        else:
            query = Query(prompt=text, group=shard.stem, prompt_source=source)
            sets.append(CandidateSet(queries=(query,), paths=shard_items(shard, reading)))
    return sets


def _first_caption(samples: Iterator[NamedSample]) -> str | None:
    """The first caption among the samples (read no further), or None."""
    for n in samples:
        if n.sample.caption:
            return n.sample.caption
    return None


def _checked_groups(sets: list[CandidateSet], folder: str) -> list[CandidateSet]:
    """best-of-n's groups, or a usage error when there are none, or none has a prompt."""
    if not sets:
        raise NoImages(f"no images found in {folder}")
    if all(s.error is not None and s.error.startswith("no prompt") for s in sets):  # the model would load for nothing
        hint, what = ((NO_PROMPT, "give --prompt TEXT, add prompt.txt, or embed it in the image metadata")
                      if sets[0].error.startswith(NO_PROMPT) else  # type: ignore[union-attr]
                      (SHARD_NO_PROMPT, "give --prompt TEXT, or caption the samples"))
        first = sets[0].error[len(hint):].strip(" ()")  # type: ignore[index]
        raise UsageError(f"none of the {len(sets)} group(s) has a prompt: {what} ({sets[0].source}: {first})")
    return sets


# -- batch ----------------------------------------------------------------------------------------------

def read_prompts_csv(path: str) -> list[dict[str, str]]:
    """Rows of a prompts CSV: UTF-8 (BOM allowed), delimiter sniffed among , ; tab |, blank lines skipped."""
    text = read_utf8(path)
    if not text.strip():
        raise UsageError(f"{path}: empty CSV")
    header = text.splitlines()[0]
    try:
        dialect = csv.Sniffer().sniff(header, delimiters=",;\t|")
        delimiter = dialect.delimiter
    except csv.Error:
        delimiter = ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    fields = [f.strip() for f in (reader.fieldnames or [])]
    if "prompt" not in fields:
        raise UsageError(f"{path}: no 'prompt' column (found: {', '.join(fields) or 'none'})")
    rows = []
    try:
        for row in reader:
            row = {(k or "").strip(): (v or "") for k, v in row.items() if k is not None}
            if not any(v.strip() for v in row.values()):
                continue
            rows.append(row)
    except csv.Error as e:  # e.g. a field over the csv module's size limit, or a NUL byte
        raise UsageError(f"{path}: line {reader.line_num}: malformed CSV: {e}") from None
    if not rows:
        raise UsageError(f"{path}: no rows")
    return rows


def _row_images(spec: str, base: str) -> list[str]:
    """A row's `images` cell: a folder, a glob, or paths separated by ';', relative to the CSV's folder `base` (as
    given: relative when the CSV was named relatively, so records show them as they show PATH arguments)."""
    parts = [p.strip() for p in spec.split(";") if p.strip()]
    return [p if os.path.isabs(os.path.expanduser(p)) else os.path.join(base, p) for p in
            (os.path.expanduser(x) for x in parts)]


def sets_for_batch(csv_path: str, args: list[str], stdin: TextIO | None = None, max_bytes: int | None = None,
                   files_only: str | None = None, options: DatasetOptions = DatasetOptions()
                   ) -> list[CandidateSet]:
    """`pickrank batch`: one ranking per CSV row; rows without `images` share the PATH arguments' images. PATHs
    and `images` cells may name dataset shards, whose samples are read in memory within max_bytes; files_only:
    the option that needs image files (--html), which refuses them; options: where a sample's parts are."""
    rows = read_prompts_csv(csv_path)
    base = os.path.dirname(csv_path)
    check_named_paths(args)
    shared_queries: list[Query] = []
    own: dict[str, list[Query]] = {}
    order: list[str | None] = []  # set order: None stands for the shared set, at its first row
    ids: dict[str, int] = {}
    for n, row in enumerate(rows, start=1):
        prompt = row.get("prompt", "")
        if not prompt.strip():
            raise UsageError(f"{csv_path}: row {n} has an empty prompt")
        q = Query(prompt=prompt, id=(row.get("id") or "").strip() or str(n), prompt_source="csv")
        if q.id in ids:  # each row is still its own ranking, in row order
            log.warning("%s: id %r of row %d repeats row %d's", csv_path, q.id, n, ids[q.id])
        ids.setdefault(q.id, n)
        spec = (row.get("images") or "").strip()
        if spec:
            if spec not in own:
                own[spec] = []
                order.append(spec)
            own[spec].append(q)
        else:
            if not shared_queries:
                order.append(None)
            shared_queries.append(q)
    if shared_queries and not args:
        raise UsageError(f"{csv_path}: {len(shared_queries)} row(s) have no 'images' and no PATH was given")
    sets: list[CandidateSet] = []
    for spec in order:
        if spec is None:
            first, paths = peek(expand_items(args, stdin, max_bytes, files_only, options))
            if first is None:
                raise NoImages(f"no images found in {' '.join(args)}")
            sets.append(CandidateSet(queries=tuple(shared_queries), paths=paths))
        else:
            first, paths = peek(_cell_items(_row_images(spec, base), max_bytes, files_only, options))
            if first is None:
                log.warning("%s: images %r match no file (row %s)", csv_path, spec,
                            ", ".join(q.id or "?" for q in own[spec]))
                sets.append(CandidateSet(queries=tuple(own[spec]), source=spec,
                                         error=f"images {spec!r} match no file"))
            else:
                sets.append(CandidateSet(queries=tuple(own[spec]), paths=paths))
    return sets


def _cell_items(paths: list[str], max_bytes: int | None, files_only: str | None,
                options: DatasetOptions) -> Iterator[Item]:
    """A row's images (shards' samples too); a pattern of shards that matches none is a row with no images."""
    try:
        return expand_items(paths, None, max_bytes, files_only, options)
    except NoImages:
        return iter(())
