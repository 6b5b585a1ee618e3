"""The comparison's plan: the layout the arguments name (prompts CSV, paired folders, manifest), the systems, and
each prompt's images per system (`Slot`s); `Comparison.candidate_sets()` is what the engine scores."""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

from pickrank.errors import UsageError
from pickrank.inputs.datasets.paths import is_dataset_arg
from pickrank.inputs.decode import DEFAULT_MAX_PIXELS
from pickrank.inputs.discover import is_image_name
from pickrank.inputs.files import DEFAULT_MAX_BYTES
from pickrank.inputs.sets import group_prompt, prompt_from_metadata, read_prompts_csv
from pickrank.inputs.textfile import check_text, loads_json, read_utf8
from pickrank.records import CandidateSet, Query

log = logging.getLogger("pickrank")

# The layout names, and how --help / -v describe them.
LAYOUTS = {
    "prompts-csv": "folders per system + a prompts CSV (id,prompt): images id.<ext> or id/*",
    "paired-folders": "folders per system, images paired by relative path; prompts from prompt.txt or metadata",
    "manifest": "a manifest (CSV or JSONL) with system,prompt,image[,id]",
}


@dataclass(frozen=True)
class Slot:
    """One prompt of the comparison: its id, text, and per system (in `Comparison.systems` order) its images."""

    id: str
    prompt: str
    images: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Excluded:
    """A prompt left out of the whole comparison (systems disagree on its text, or none has one), and why."""

    id: str
    reason: str


@dataclass(frozen=True)
class Comparison:
    """What to score: the layout detected, the systems (baseline first in `pairs`), the prompts and their images."""

    layout: str
    systems: tuple[str, ...]
    baseline: str
    slots: tuple[Slot, ...]
    excluded: tuple[Excluded, ...] = ()

    def missing(self) -> list[tuple[str, str]]:
        """(system, prompt id) for each prompt a system has no image for: left out of that system's pairs."""
        return [(s, slot.id) for slot in self.slots for s, imgs in zip(self.systems, slot.images) if not imgs]

    def image_paths(self) -> list[str]:
        """Every distinct image path, in plan order."""
        return list(dict.fromkeys(p for slot in self.slots for imgs in slot.images for p in imgs))

    def candidate_sets(self) -> list[CandidateSet]:
        """One set per prompt with all systems' images (each path once): each image is embedded once."""
        return [CandidateSet(queries=(Query(prompt=slot.prompt, id=slot.id),),
                             paths=tuple(dict.fromkeys(p for imgs in slot.images for p in imgs)))
                for slot in self.slots]


def detect_layout(paths: Sequence[str], prompts_csv: str | None = None, manifest: str | None = None) -> str:
    """The layout the arguments name: a manifest (--manifest, or one file argument), folders + CSV, or folders."""
    if manifest is not None or (len(paths) == 1 and os.path.isfile(paths[0])):
        if manifest is not None and paths:
            raise UsageError("give either --manifest or system folders, not both")
        if prompts_csv is not None:
            raise UsageError("--prompts goes with system folders, not with a manifest")
        return "manifest"
    return "prompts-csv" if prompts_csv is not None else "paired-folders"


def plan_comparison(paths: Sequence[str] = (), *, prompts_csv: str | None = None, manifest: str | None = None,
                    names: Sequence[str] | None = None, baseline: str | None = None,
                    max_pixels: int | None = DEFAULT_MAX_PIXELS,
                    max_bytes: int | None = DEFAULT_MAX_BYTES, series: bool = False) -> Comparison:
    """The comparison the arguments describe; UsageError (exit 2) for bad input. `series`: the systems are a
    run's checkpoints, ordered by the numbers in their names, the first the baseline (`watch.as_series`)."""
    _refuse_shards(paths)
    if series:
        if baseline is not None:
            raise UsageError("--series compares each checkpoint with the first: leave out --baseline")
        return as_series(plan_comparison(expand_globs(paths), prompts_csv=prompts_csv, manifest=manifest,
                                         names=names, max_pixels=max_pixels, max_bytes=max_bytes))
    layout = detect_layout(paths, prompts_csv, manifest)
    if layout == "manifest":
        systems, slots, excluded = _manifest_plan(manifest or paths[0])
    else:
        _check_folders(paths)
        systems = tuple(os.path.basename(os.path.abspath(p)) for p in paths)
        if layout == "prompts-csv":
            slots, excluded = _csv_plan(paths, prompts_csv or ""), ()
        else:
            slots, excluded = _paired_plan(paths, systems if names is None else tuple(names), max_pixels,
                                           max_bytes)
    systems = _system_names(systems, names)
    if baseline is not None and baseline not in systems:
        raise UsageError(f"--baseline {baseline!r} is not one of the systems: {', '.join(systems)}")
    if not slots:
        raise UsageError("no prompt has images to compare")
    _check_every_system_has_images(systems, slots)
    return Comparison(layout, systems, baseline or systems[0], tuple(slots), tuple(excluded))


def expand_globs(paths: Sequence[str]) -> list[str]:
    """Each argument that is not a path but a glob pattern ('runs/step_*', quoted from the shell) as the folders it
    matches; the others as they are."""
    out: list[str] = []
    for p in paths:
        magic = glob.has_magic(p) and not os.path.exists(p)
        out.extend((sorted(m for m in glob.glob(p) if os.path.isdir(m)) if magic else []) or [p])
    return out


def as_series(plan: Comparison) -> Comparison:
    """The plan with its systems ordered by the numbers in their names (step_20 before step_100), each slot's
    images with them, the first checkpoint the baseline."""
    order = sorted(range(len(plan.systems)), key=lambda i: _natural(plan.systems[i]))
    systems = tuple(plan.systems[i] for i in order)
    slots = tuple(Slot(s.id, s.prompt, tuple(s.images[i] for i in order)) for s in plan.slots)
    return Comparison(plan.layout, systems, systems[0], slots, plan.excluded)


def _check_every_system_has_images(systems: Sequence[str], slots: Sequence[Slot]) -> None:
    """A system without a single image to score is a usage error (before the model loads): its pairs would all be
    left out, and the comparison would say nothing about it."""
    for i, name in enumerate(systems):
        if not any(slot.images[i] for slot in slots):
            raise UsageError(f"system {name!r} has no images to compare (in the prompts the comparison keeps)")


def _refuse_shards(paths: Sequence[str]) -> None:
    """Dataset shards are a usage error: systems are paired by image file names, which a shard's samples lack (a
    tar is read in order, not looked up by key)."""
    for p in paths:
        if is_dataset_arg(p):
            raise UsageError(f"{p}: compare pairs image files across system folders and reads no dataset shards; "
                             "score each system's shards with pickrank score -p TEXT or --prompt-from caption")


def _check_folders(paths: Sequence[str]) -> None:
    if len(paths) < 2:
        raise UsageError("compare needs at least two system folders (or a manifest)")
    for p in paths:
        if not os.path.isdir(p):
            raise UsageError(f"{p}: not a folder")


def _system_names(found: tuple[str, ...], names: Sequence[str] | None) -> tuple[str, ...]:
    """The system names: --names (one per system, distinct) or the ones found, which must be distinct."""
    if names is not None:
        names = tuple(n.strip() for n in names)
        if len(names) != len(found):
            raise UsageError(f"--names gives {len(names)} name(s) for {len(found)} systems")
        found = names
    if any(not n for n in found):
        raise UsageError("a system name is empty")
    dup = sorted({n for n in found if found.count(n) > 1})
    if dup:
        raise UsageError(f"two systems are both named {dup[0]!r}: give --names A,B,...")
    if len(found) < 2:
        raise UsageError(f"compare needs at least two systems (found: {', '.join(found) or 'none'})")
    return found


def _id_key(name: str) -> str:
    """How ids and file names are matched: an all-digit name without its leading zeros (00042 is 42)."""
    return str(int(name)) if name.isascii() and name.isdigit() else name


def _natural(key: str) -> list:
    """Sort key that puts 2 before 10."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", key) if t]


def _images_in(folder: str) -> list[str]:
    """The image files directly in folder, sorted; a folder that cannot be listed is warned about (no images)."""
    try:
        with os.scandir(folder) as it:
            return sorted(e.path for e in it if is_image_name(e.name) and not e.is_dir())
    except OSError as e:
        log.warning("%s: cannot read folder: %s", folder, e.strerror or e)
        return []


def _folder_index(folder: str) -> dict[str, list[str]]:
    """Images of a system folder by id key: file `id.<ext>` and the images in subfolder `id/`."""
    index: dict[str, list[str]] = {}
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise UsageError(f"{folder}: cannot read folder: {e.strerror or e}") from None
    for e in entries:
        if is_image_name(e.name) and not e.is_dir():
            index.setdefault(_id_key(os.path.splitext(e.name)[0]), []).append(e.path)
        elif e.is_dir():
            index.setdefault(_id_key(e.name), []).extend(_images_in(e.path))
    return index


def _csv_plan(folders: Sequence[str], prompts_csv: str) -> list[Slot]:
    """Layout prompts-csv: each CSV row is a prompt; each system folder's images for it are found by id."""
    rows = read_prompts_csv(prompts_csv)
    indexes = [_folder_index(f) for f in folders]
    slots, seen = [], {}
    for n, row in enumerate(rows, start=1):
        prompt = row.get("prompt", "")
        if not prompt.strip():
            raise UsageError(f"{prompts_csv}: row {n} has an empty prompt")
        pid = (row.get("id") or "").strip() or str(n)
        if _id_key(pid) in seen:
            raise UsageError(f"{prompts_csv}: id {pid!r} of row {n} repeats row {seen[_id_key(pid)]}'s")
        seen[_id_key(pid)] = n
        slots.append(Slot(pid, prompt, tuple(tuple(ix.get(_id_key(pid), ())) for ix in indexes)))
    for folder, ix in zip(folders, indexes):
        extra = sum(len(v) for k, v in ix.items() if k not in seen)
        if extra:
            log.warning("%s: %d image(s) match no id of %s", folder, extra, prompts_csv)
    return slots


def _walk_folders(root: str) -> Iterator[tuple[str, list[str]]]:
    """(folder, its images) for each folder under root with images, sorted, symlinked folders followed once."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: log.warning(
            "%s: cannot read folder: %s", e.filename, e.strerror or e), followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        images = sorted(os.path.join(dirpath, f) for f in filenames if is_image_name(f))
        if images:
            yield dirpath, images


def _system_slots(root: str, max_pixels: int | None, max_bytes: int | None
                  ) -> dict[str, tuple[list[str], str | None]]:
    """Slots of one system folder: key -> (images, prompt or None).

    A folder is one prompt's samples (key: its relative path) when it has a prompt.txt or, below the system
    folder itself, all its images carry the same prompt in their metadata; otherwise each image is its own slot
    (key: relative path without extension). The system folder's own images are single slots unless it has a
    prompt.txt: two systems with one top-level image each must not turn into a one-prompt comparison.
    """
    slots: dict[str, tuple[list[str], str | None]] = {}
    for dirpath, images in _walk_folders(root):
        rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
        if os.path.isfile(os.path.join(dirpath, "prompt.txt")):
            groups = [(rel, images, group_prompt(dirpath, images, None, max_pixels, max_bytes))]
        else:
            found = [prompt_from_metadata(p, max_pixels, max_bytes) for p in images]
            if rel != "." and found[0] and len(set(found)) == 1:
                groups = [(rel, images, found[0])]
            else:
                groups = [(os.path.splitext(os.path.basename(p))[0] if rel == "." else
                           f"{rel}/{os.path.splitext(os.path.basename(p))[0]}", [p], t)
                          for p, t in zip(images, found)]
        for key, imgs, text in groups:
            old_imgs, old_text = slots.get(key, ([], None))
            slots[key] = (old_imgs + imgs, old_text or text)
    return slots


def _agreed_prompt(key: str, systems: Sequence[str], texts: Sequence[str | None]) -> str | Excluded:
    """The slot's prompt when the systems that have one agree; else why the slot is left out."""
    distinct = {t.strip() for t in texts if t and t.strip()}
    if len(distinct) == 1:
        return distinct.pop()
    if not distinct:
        return Excluded(key, "no prompt: add prompt.txt or embed it in the images' metadata")
    shown = "; ".join(f"{s}: {t.strip()!r}" for s, t in zip(systems, texts) if t and t.strip())
    return Excluded(key, f"the systems disagree on the prompt ({shown})")


def _paired_plan(folders: Sequence[str], systems: Sequence[str], max_pixels: int | None,
                 max_bytes: int | None) -> tuple[list[Slot], list[Excluded]]:
    """Layout paired-folders: slots paired by relative path; a slot whose prompts disagree is left out."""
    per_system = [_system_slots(f, max_pixels, max_bytes) for f in folders]
    keys = sorted({k for s in per_system for k in s}, key=_natural)
    slots, excluded = [], []
    for key in keys:
        entries = [s.get(key, ([], None)) for s in per_system]
        prompt = _agreed_prompt(key, systems, [t for _, t in entries])
        if isinstance(prompt, Excluded):
            log.warning("%s: left out of the comparison: %s", key, prompt.reason)
            excluded.append(prompt)
        else:
            slots.append(Slot(key, prompt, tuple(tuple(imgs) for imgs, _ in entries)))
    return slots, excluded


def _manifest_rows(path: str) -> list[tuple[str, dict]]:
    """(where, row) for each row of a manifest: JSON Lines (.jsonl/.ndjson or a first '{') or CSV."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv" or (ext not in (".jsonl", ".ndjson") and not read_utf8(path).lstrip().startswith("{")):
        return [(f"{path} row {n}", row) for n, row in enumerate(read_prompts_csv(path), start=1)]
    rows = []
    for n, line in enumerate(read_utf8(path).splitlines(), start=1):
        if line.strip():
            try:
                row = loads_json(line)
            except ValueError as e:  # malformed, or nested too deep to read safely
                raise UsageError(f"{path} line {n}: not JSON ({e})") from None
            if not isinstance(row, dict):
                raise UsageError(f"{path} line {n}: not an object with system, prompt, image")
            rows.append((f"{path} line {n}", row))
    if not rows:
        raise UsageError(f"{path}: no rows")
    return rows


def _manifest_plan(path: str) -> tuple[tuple[str, ...], list[Slot], list[Excluded]]:
    """Layout manifest: rows system,prompt,image[,id]; a slot is an id (or the prompt text when there is none)."""
    base = os.path.dirname(os.path.abspath(path))
    systems: dict[str, None] = {}
    slots: dict[str, tuple[list[str | None], dict[str, list[str]]]] = {}
    for where, row in _manifest_rows(path):
        def cell(key: str, required: bool = True) -> str:
            v = row.get(key)
            v = "" if v is None else str(v).strip()
            if required and not v:
                raise UsageError(f"{where}: no '{key}' (a manifest row has system, prompt, image)")
            return v
        system, prompt, image = cell("system"), check_text(cell("prompt"), f"{where}: prompt"), cell("image")
        image = os.path.expanduser(image)
        systems.setdefault(system)
        texts, images = slots.setdefault(cell("id", False) or prompt, ([], {}))
        texts.append(prompt)
        images.setdefault(system, []).append(image if os.path.isabs(image) else os.path.join(base, image))
    names = tuple(systems)
    out, excluded = [], []
    for key, (texts, images) in slots.items():
        if len(set(texts)) > 1:
            reason = f"its rows disagree on the prompt ({'; '.join(repr(t) for t in dict.fromkeys(texts))})"
            log.warning("%s: id %s left out of the comparison: %s", path, key, reason)
            excluded.append(Excluded(key, reason))
        else:
            out.append(Slot(key, texts[0], tuple(tuple(images.get(s, ())) for s in names)))
    return names, out, excluded


__all__ = ["LAYOUTS", "Slot", "Excluded", "Comparison", "detect_layout", "plan_comparison", "as_series",
           "expand_globs"]
