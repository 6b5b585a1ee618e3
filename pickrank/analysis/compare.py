"""`pickrank compare`: which text-to-image system is better on a fixed prompt set, with confidence intervals.

Four stages, frozen dataclasses between them, no torch here:
  1. layout: `plan_comparison(...)` turns folders / a prompts CSV / a manifest into a `Comparison` (systems,
     prompts, each system's image paths per prompt); `Comparison.candidate_sets()` is what the engine scores.
  2. `collect_scores(plan, records)` turns the engine's `Record`s into a `ScoreTable` (or build one with
     `ScoreTable.from_scores` from plain lists).
  3. `compare(table, ...)`: the statistics (numpy only, vectorised, paired bootstrap) -> `CompareResult`.
  4. renderers: `print_table`, `to_json`, `write_csv`, `per_prompt_rows` / `write_per_prompt`
     (and `pickrank.report.comparison.write_html`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import IO, Iterable, Iterator, Mapping, Sequence

import numpy as np

from pickrank.errors import UsageError
from pickrank.inputs.discover import is_image_name
from pickrank.inputs.reader import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from pickrank.inputs.sets import group_prompt, prompt_from_metadata, read_prompts_csv
from pickrank.inputs.textfile import read_utf8
from pickrank.records import CandidateSet, Query, Record

log = logging.getLogger("pickrank")

DEFAULT_BOOTSTRAP = 10_000
DEFAULT_SEED = 0
DEFAULT_CONFIDENCE = 0.95

# The layout names, and how --help / -v describe them.
LAYOUTS = {
    "prompts-csv": "folders per system + a prompts CSV (id,prompt): images id.<ext> or id/*",
    "paired-folders": "folders per system, images paired by relative path; prompts from prompt.txt or metadata",
    "manifest": "a manifest (CSV or JSONL) with system,prompt,image[,id]",
}


# -- 1. the plan -----------------------------------------------------------------------------------------

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
                    max_bytes: int | None = DEFAULT_MAX_BYTES) -> Comparison:
    """The comparison the arguments describe; UsageError (exit 2) for bad input."""
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
    return Comparison(layout, systems, baseline or systems[0], tuple(slots), tuple(excluded))


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
                row = json.loads(line)
            except ValueError as e:
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
        system, prompt, image = cell("system"), cell("prompt"), cell("image")
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


# -- 2. the scores ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """One image's score for its prompt; score None with the reason when the image failed."""

    path: str | None
    score: float | None
    error: str | None = None


@dataclass(frozen=True)
class PromptScores:
    """One prompt: per system (in `ScoreTable.systems` order) its samples; () when the system has no image."""

    id: str
    prompt: str
    samples: tuple[tuple[Sample, ...], ...]


@dataclass(frozen=True)
class ScoreTable:
    """Every system's sample scores for every prompt: the statistics' input."""

    systems: tuple[str, ...]
    baseline: str
    prompts: tuple[PromptScores, ...]
    layout: str = "scores"
    excluded: tuple[Excluded, ...] = ()

    @classmethod
    def from_scores(cls, scores: Mapping[str, Sequence[Sequence[float | None] | None]],
                    ids: Sequence[str] | None = None, prompts: Sequence[str] | None = None,
                    baseline: str | None = None) -> ScoreTable:
        """From plain lists: scores[system][i] = that prompt's sample scores (None: a failed image; [] or None:
        no image)."""
        systems = tuple(scores)
        n = len(next(iter(scores.values()), []))
        if any(len(v) != n for v in scores.values()):
            raise ValueError("every system needs one entry per prompt")
        ids = [str(i + 1) for i in range(n)] if ids is None else [str(i) for i in ids]
        texts = list(prompts) if prompts is not None else [""] * n

        def samples(vals: Sequence[float | None] | None) -> tuple[Sample, ...]:
            return tuple(Sample(None, None if v is None else float(v), None if v is not None else "failed")
                         for v in vals or ())

        rows = tuple(PromptScores(ids[i], texts[i], tuple(samples(scores[s][i]) for s in systems))
                     for i in range(n))
        return cls(systems, baseline or systems[0], rows)


def collect_scores(plan: Comparison, records: Iterable[Record]) -> ScoreTable:
    """The engine's records (one per (prompt, image), scored or failed) laid out as the plan's ScoreTable.

    An image with no record at all is counted as failed ("not scored"), never dropped silently.
    """
    by_key: dict[tuple[str | None, str], Record] = {}
    set_errors: dict[str | None, str] = {}
    for r in records:
        if r.path is None:
            set_errors[r.prompt] = r.error or "not scored"
        else:
            by_key[(r.prompt, os.path.normpath(r.path))] = r

    def sample(prompt: str, path: str) -> Sample:
        r = by_key.get((prompt, os.path.normpath(path)))
        if r is None:
            return Sample(path, None, set_errors.get(prompt, "not scored"))
        if r.error is not None or r.score is None:
            return Sample(path, None, r.error or "no score")
        return Sample(path, float(r.score))

    rows = tuple(PromptScores(slot.id, slot.prompt, tuple(tuple(sample(slot.prompt, p) for p in imgs)
                                                          for imgs in slot.images)) for slot in plan.slots)
    return ScoreTable(plan.systems, plan.baseline, rows, plan.layout, plan.excluded)


# -- 3. the statistics -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SystemStats:
    """One system: mean PickScore over its prompts (a prompt's score: the mean of its samples) and its interval."""

    name: str
    mean: float | None
    low: float | None
    high: float | None
    prompts: int
    images: int
    failed: int
    missing: tuple[str, ...]  # ids of prompts with no scored image for this system


@dataclass(frozen=True)
class PairStats:
    """`system` against `reference` over the prompts both have: win rate (tie 0.5), difference, test."""

    system: str
    reference: str
    prompts: int
    wins: int
    ties: int
    losses: int
    win_rate: float | None
    win_low: float | None
    win_high: float | None
    mean_diff: float | None
    diff_low: float | None
    diff_high: float | None
    pref_prob: float | None  # mean of sigmoid(score_a - score_b): PickScore's softmax prob for the two
    pref_low: float | None
    pref_high: float | None
    p_value: float  # exact two-sided sign test, ties dropped
    sample_win_rate: float | None = None  # all sample pairs within a prompt, prompts weighted equally
    sample_low: float | None = None
    sample_high: float | None = None


@dataclass(frozen=True)
class BestOfK:
    """Expected win rate of `system`'s best-of-k sample (best by PickScore) against one `reference` sample."""

    system: str
    reference: str
    prompts: int
    ks: tuple[int, ...]
    win: tuple[float, ...]
    low: tuple[float | None, ...]
    high: tuple[float | None, ...]


@dataclass(frozen=True)
class CompareResult:
    """The statistics of one comparison, with the settings that produced them."""

    systems: tuple[SystemStats, ...]
    pairs: tuple[PairStats, ...]
    best_of_k: tuple[BestOfK, ...]
    baseline: str
    prompts: int
    all_pairs: bool
    bootstrap: int
    seed: int
    confidence: float
    layout: str = "scores"
    excluded: tuple[Excluded, ...] = ()
    model: dict = field(default_factory=dict)  # the run's provenance, which the CLI fills (`provenance.Provenance`)

    def pair(self, system: str, reference: str) -> PairStats | None:
        """The pair's statistics in either orientation (win rates mirrored), or None when not computed."""
        for p in self.pairs:
            if (p.system, p.reference) == (system, reference):
                return p
            if (p.system, p.reference) == (reference, system):
                return _mirror(p)
        return None


def _mirror(p: PairStats) -> PairStats:
    """reference against system: the same numbers from the other side."""
    def neg(x: float | None) -> float | None:
        return None if x is None else -x

    def one_minus(x: float | None) -> float | None:
        return None if x is None else 1.0 - x

    return PairStats(p.reference, p.system, p.prompts, p.losses, p.ties, p.wins, one_minus(p.win_rate),
                     one_minus(p.win_high), one_minus(p.win_low), neg(p.mean_diff), neg(p.diff_high),
                     neg(p.diff_low), one_minus(p.pref_prob), one_minus(p.pref_high), one_minus(p.pref_low),
                     p.p_value, one_minus(p.sample_win_rate), one_minus(p.sample_high), one_minus(p.sample_low))


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test p-value (binomial, p = 1/2; ties already dropped): 1.0 with no untied prompt."""
    n = wins + losses
    if n == 0:
        return 1.0
    term = tail = 1  # C(n, 0); each next coefficient from the last one, in exact integers
    for i in range(min(wins, losses)):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / (1 << n))  # one rounding, at the division


def _padded(table: ScoreTable) -> list[np.ndarray]:
    """Per system a (P, n_max) array of its scored samples, NaN-padded (failed images left out)."""
    out = []
    for s in range(len(table.systems)):
        vals = [[x.score for x in row.samples[s] if x.score is not None] for row in table.prompts]
        width = max([1] + [len(v) for v in vals])
        arr = np.full((len(vals), width), np.nan)
        for i, v in enumerate(vals):
            arr[i, :len(v)] = v
        out.append(arr)
    return out


def _prompt_means(samples: np.ndarray) -> np.ndarray:
    """Each prompt's mean sample score; NaN where it has none."""
    n = np.sum(~np.isnan(samples), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.nansum(samples, axis=1) / np.maximum(n, 1), np.nan)


def _pair_wins(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(P, na, nb): 1 where a's sample beats b's, 0.5 for a tie, 0 otherwise (also where a sample is padding)."""
    x, y = a[:, :, None], b[:, None, :]
    return (x > y) + 0.5 * (x == y)


def _best_of_k_values(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """Per k = 1..(fewest samples of a on mask), each prompt's expected win of a's best-of-k against one b sample.

    Exact over all k-subsets: for a's samples sorted ascending, the j-th smallest (j = 1..n) is the best of a
    random k-subset with probability C(j-1, k-1) / C(n, k).
    """
    a = np.sort(a, axis=1)  # NaN padding goes last
    na = np.sum(~np.isnan(a), axis=1)
    nb = np.sum(~np.isnan(b), axis=1)
    per_sample = _pair_wins(a, b).sum(axis=2) / np.maximum(nb, 1)[:, None]  # (P, na_max)
    kmax = int(na[mask].min()) if mask.any() else 0
    width = a.shape[1]
    comb = np.array([[math.comb(n, j) for j in range(width + 1)] for n in range(width + 1)], dtype=float)
    out = []
    for k in range(1, kmax + 1):
        with np.errstate(invalid="ignore", divide="ignore"):  # prompts without samples: masked out below
            weights = comb[np.arange(width), k - 1][None, :] / comb[na, k][:, None]
        weights[np.arange(width)[None, :] >= na[:, None]] = 0.0
        out.append(np.where(mask, np.sum(weights * per_sample, axis=1), 0.0))
    return out


class _Columns:
    """Per-prompt statistics (value, which prompts count) whose means over prompts are point estimates; the
    bootstrap resamples them all with the same prompt indices."""

    def __init__(self, n_prompts: int) -> None:
        self.values: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.n = n_prompts

    def add(self, values: np.ndarray, mask: np.ndarray) -> int:
        self.values.append(np.where(mask, values, 0.0))
        self.masks.append(mask)
        return len(self.values) - 1

    def estimates(self, bootstrap: int, seed: int, confidence: float) -> tuple[np.ndarray, np.ndarray,
                                                                                 np.ndarray]:
        """Point estimates and the percentile interval's low and high, one per column."""
        values = np.stack(self.values, axis=1) if self.values else np.zeros((self.n, 0))
        masks = np.stack(self.masks, axis=1).astype(float) if self.masks else np.zeros((self.n, 0))
        with np.errstate(invalid="ignore", divide="ignore"):
            point = values.sum(axis=0) / masks.sum(axis=0)
        if bootstrap <= 0 or self.n == 0 or not self.values:
            nan = np.full(len(self.values), np.nan)
            return point, nan, nan
        boot = bootstrap_means(values, masks, bootstrap, seed)
        alpha = (1.0 - confidence) / 2.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a column no resample can estimate: NaN
            low, high = np.nanpercentile(boot, [100 * alpha, 100 * (1 - alpha)], axis=0)
        return point, low, high


def bootstrap_means(values: np.ndarray, masks: np.ndarray, bootstrap: int, seed: int) -> np.ndarray:
    """(bootstrap, K) resampled means of each column of values (P, K) over the prompts its mask (P, K) counts.

    Each resample draws P prompt indices with replacement, once, for every column (paired intervals). Counts
    per prompt turn the means into two matrix products; rows are drawn in chunks to bound memory.
    """
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    unique, which = np.unique(masks, axis=1, return_inverse=True)  # columns share few masks: fewer products
    which = np.asarray(which).reshape(-1)
    chunk = max(1, min(1000, (1 << 22) // max(n, 1)))
    out = np.empty((bootstrap, values.shape[1]))
    counts = np.empty((chunk, n))
    small = np.uint16 if n <= 1 << 16 else np.int64  # fewer random bits per index: the draw is the slow part
    for start in range(0, bootstrap, chunk):
        m = min(chunk, bootstrap - start)
        idx = rng.integers(0, n, size=(m, n), dtype=small)
        for i in range(m):  # one row at a time: a bincount over P bins stays in cache
            counts[i] = np.bincount(idx[i], minlength=n)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + m] = (counts[:m] @ values) / (counts[:m] @ unique)[:, which]
    return out


def _pairs(systems: Sequence[str], baseline: str, all_pairs: bool) -> list[tuple[int, int]]:
    """(system, reference) indices: each against the baseline; with all_pairs every pair, the earlier system
    (baseline first) as reference."""
    order = [systems.index(baseline)] + [i for i in range(len(systems)) if systems[i] != baseline]
    if not all_pairs:
        return [(j, order[0]) for j in order[1:]]
    return [(order[j], order[i]) for i in range(len(order)) for j in range(i + 1, len(order))]


def _opt(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def compare(table: ScoreTable, *, baseline: str | None = None, all_pairs: bool = False,
            bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = DEFAULT_SEED, confidence: float = DEFAULT_CONFIDENCE,
            best_of_n: bool = False, raw_per_unit: float = 1.0) -> CompareResult:
    """Every statistic of the comparison: per system, per pair, and (best_of_n) the best-of-k curves.

    `raw_per_unit`: what a score in the table's unit is in raw PickScore (`Scale.divisor`; 1 for raw scores), so
    that the preference probability is PickScore's softmax whatever unit the scores are reported in."""
    baseline = baseline or table.baseline
    if baseline not in table.systems:
        raise UsageError(f"--baseline {baseline!r} is not one of the systems: {', '.join(table.systems)}")
    if bootstrap < 0:
        raise UsageError("--bootstrap must be 0 or more")
    if not 0.0 < confidence < 1.0:
        raise UsageError("the confidence level must be between 0 and 1")
    samples = _padded(table)
    means = [_prompt_means(s) for s in samples]
    valid = [~np.isnan(m) for m in means]
    cols = _Columns(len(table.prompts))
    sys_cols = [cols.add(np.nan_to_num(m), v) for m, v in zip(means, valid)]
    pairs = _pairs(table.systems, baseline, all_pairs)
    pair_cols, curve_cols = [], []
    for a, b in pairs:
        mask = valid[a] & valid[b]
        d = np.nan_to_num(means[a] - means[b])
        wins = _pair_wins(samples[a], samples[b])
        size = np.maximum(np.sum(~np.isnan(samples[a]), 1) * np.sum(~np.isnan(samples[b]), 1), 1)
        pair_cols.append((cols.add((d > 0) + 0.5 * (d == 0), mask), cols.add(d, mask),
                          cols.add(0.5 * (1.0 + np.tanh(d * raw_per_unit / 2.0)), mask),  # sigmoid, no overflow
                          cols.add(wins.sum(axis=(1, 2)) / size, mask)))
        if best_of_n:
            for x, y in ((a, b), (b, a)):
                if samples[x].shape[1] >= 2:
                    ks = _best_of_k_values(samples[x], samples[y], mask)
                    if len(ks) >= 2:
                        curve_cols.append((x, y, int(mask.sum()), [cols.add(v, mask) for v in ks]))
    point, low, high = cols.estimates(bootstrap, seed, confidence)
    est = (lambda c: (_opt(point[c]), _opt(low[c]), _opt(high[c])))
    systems = tuple(_system_stats(table, s, est(sys_cols[s])) for s in range(len(table.systems)))
    pair_stats = tuple(_pair_stats(table, a, b, means, samples, [est(c) for c in pc])
                       for (a, b), pc in zip(pairs, pair_cols))
    curves = tuple(BestOfK(table.systems[x], table.systems[y], n, tuple(range(1, len(cs) + 1)),
                           tuple(float(point[c]) for c in cs), tuple(_opt(low[c]) for c in cs),
                           tuple(_opt(high[c]) for c in cs)) for x, y, n, cs in curve_cols)
    return CompareResult(systems, pair_stats, curves, baseline, len(table.prompts), all_pairs, bootstrap, seed,
                         confidence, table.layout, table.excluded)


def _system_stats(table: ScoreTable, s: int, est: tuple) -> SystemStats:
    scored = [sum(x.score is not None for x in row.samples[s]) for row in table.prompts]
    failed = sum(x.score is None for row in table.prompts for x in row.samples[s])
    missing = tuple(row.id for row, n in zip(table.prompts, scored) if n == 0)
    return SystemStats(table.systems[s], *est, prompts=sum(n > 0 for n in scored), images=sum(scored),
                       failed=failed, missing=missing)


def _pair_stats(table: ScoreTable, a: int, b: int, means: list[np.ndarray], samples: list[np.ndarray],
                ests: list[tuple]) -> PairStats:
    mask = ~np.isnan(means[a]) & ~np.isnan(means[b])
    d = (means[a] - means[b])[mask]
    wins, losses = int(np.sum(d > 0)), int(np.sum(d < 0))
    several = max(np.sum(~np.isnan(samples[a][mask]), 1).max(initial=0),
                  np.sum(~np.isnan(samples[b][mask]), 1).max(initial=0)) > 1
    sample = ests[3] if several else (None, None, None)
    return PairStats(table.systems[a], table.systems[b], int(mask.sum()), wins, int(d.size - wins - losses),
                     losses, *ests[0], *ests[1], *ests[2], sign_test(wins, losses), *sample)


# -- 4. output -------------------------------------------------------------------------------------------

def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ci(low: float | None, high: float | None, digits: int = 3) -> str:
    return "-" if low is None or high is None else f"[{low:.{digits}f}, {high:.{digits}f}]"


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def print_table(result: CompareResult, stream: IO[str], *, is_terminal: bool = False) -> None:
    """The summary for people: one row per system, a win-rate matrix with all pairs, best-of-k curves."""
    from rich.console import Console
    from rich.markup import escape as markup_escape
    from rich.table import Table

    from pickrank.output.terminal import terminal_safe

    def esc(text: str) -> str:  # neither rich markup nor terminal control sequences in system names
        return markup_escape(terminal_safe(text))

    console = Console(file=stream, force_terminal=is_terminal or None, width=None if is_terminal else 120)
    level = f"{round(result.confidence * 100):g}%"
    base = result.baseline
    table = Table(title=f"PickScore by system ({result.prompts} prompts, {level} intervals, "
                        f"{result.bootstrap} bootstrap resamples)", title_justify="left")
    for name, justify in (("system", "left"), ("mean", "right"), (f"{level} CI", "right"),
                          (f"win vs {esc(base)}", "right"), (f"{level} CI ", "right"), ("p", "right"),
                          ("prompts", "right"), ("images", "right")):
        table.add_column(name, justify=justify, overflow="fold")
    for s in result.systems:
        p = result.pair(s.name, base)
        win = ("baseline", "", "") if s.name == base else ("-", "-", "-") if p is None else (
            _num(p.win_rate), _ci(p.win_low, p.win_high), _p(p.p_value))
        images = f"{s.images}" + (f" ({s.failed} failed)" if s.failed else "")
        table.add_row(esc(s.name), _num(s.mean), _ci(s.low, s.high), *win, str(s.prompts), images)
    console.print(table)
    if result.all_pairs:
        console.print(_matrix_table(result, esc))
    for c in result.best_of_k:
        # The description is a cell, not the title: a title wraps to the width of a few narrow k columns.
        curve = Table(title="best-of-k win rate", title_justify="left")
        curve.add_column("best of k samples vs one sample", justify="left", overflow="fold")
        for k in c.ks:
            curve.add_column(f"k={k}", justify="right")
        curve.add_row(f"{esc(c.system)} vs {esc(c.reference)}", *(_num(w) for w in c.win))
        console.print(curve)


def _matrix_table(result: CompareResult, esc) -> object:
    """Win rate of the row's system over the column's."""
    from rich.table import Table

    names = [s.name for s in result.systems]
    table = Table()  # the description heads the row names' column: a title would wrap to a narrow matrix
    table.add_column("win rate of row over column", justify="left", overflow="fold")
    for n in names:
        table.add_column(esc(n), justify="right")
    for a in names:
        cells = []
        for b in names:
            p = None if a == b else result.pair(a, b)
            cells.append("-" if p is None else _num(p.win_rate))
        table.add_row(esc(a), *cells)
    return table


def win_matrix(result: CompareResult) -> list[list[float | None]]:
    """matrix[i][j]: win rate of system i over system j (None on the diagonal and for pairs not computed)."""
    names = [s.name for s in result.systems]
    return [[None if a == b else getattr(result.pair(a, b), "win_rate", None) for b in names] for a in names]


def to_json(result: CompareResult, model: dict | None = None) -> dict:
    """One object: settings, systems, pairs, best-of-k curves, prompts left out, model provenance."""
    return {
        "settings": {"baseline": result.baseline, "all_pairs": result.all_pairs, "bootstrap": result.bootstrap,
                     "seed": result.seed, "confidence": result.confidence, "layout": result.layout},
        "prompts": result.prompts,
        "systems": [dict(s.__dict__, missing=list(s.missing)) for s in result.systems],
        "pairs": [dict(p.__dict__) for p in result.pairs],
        "best_of_k": [dict(c.__dict__, ks=list(c.ks), win=list(c.win), low=list(c.low), high=list(c.high))
                      for c in result.best_of_k],
        "excluded": [dict(e.__dict__) for e in result.excluded],
        "model": dict(model if model is not None else result.model) or None,
    }


CSV_FIELDS = ("kind", "system", "reference", "k", "prompts", "images", "failed", "mean", "mean_low",
              "mean_high", "win_rate", "win_low", "win_high", "wins", "ties", "losses", "mean_diff", "diff_low",
              "diff_high", "pref_prob", "p_value", "sample_win_rate")


def csv_rows(result: CompareResult) -> Iterator[dict]:
    """One row per system (kind=system), per pair (kind=pair: system against reference) and per best-of-k
    point (kind=best_of_k); the columns that do not apply are empty."""
    for s in result.systems:
        yield {"kind": "system", "system": s.name, "prompts": s.prompts, "images": s.images, "failed": s.failed,
               "mean": s.mean, "mean_low": s.low, "mean_high": s.high}
    for p in result.pairs:
        yield {"kind": "pair", "system": p.system, "reference": p.reference, "prompts": p.prompts,
               "win_rate": p.win_rate, "win_low": p.win_low, "win_high": p.win_high, "wins": p.wins,
               "ties": p.ties, "losses": p.losses, "mean_diff": p.mean_diff, "diff_low": p.diff_low,
               "diff_high": p.diff_high, "pref_prob": p.pref_prob, "p_value": p.p_value,
               "sample_win_rate": p.sample_win_rate}
    for c in result.best_of_k:
        for k, w, lo, hi in zip(c.ks, c.win, c.low, c.high):
            yield {"kind": "best_of_k", "system": c.system, "reference": c.reference, "k": k,
                   "prompts": c.prompts, "win_rate": w, "win_low": lo, "win_high": hi}


def write_csv(result: CompareResult, stream: IO[str]) -> None:
    """The CSV form of csv_rows, with a header; text cells that look like formulas escaped."""
    from pickrank.output.writers import csv_safe

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for row in csv_rows(result):
        w.writerow(["" if row.get(k) is None else csv_safe(row[k]) for k in CSV_FIELDS])
    stream.write(buf.getvalue())


def prompt_scores(row: PromptScores) -> list[float | None]:
    """Each system's score for the prompt (the mean of its scored samples), None where it has none."""
    out = []
    for samples in row.samples:
        vals = [x.score for x in samples if x.score is not None]
        out.append(float(np.mean(vals)) if vals else None)
    return out


def winner(systems: Sequence[str], scores: Sequence[float | None]) -> str | None:
    """The system with the prompt's highest score; None when the top is tied or fewer than two have a score."""
    scored = sorted(((v, s) for s, v in zip(systems, scores) if v is not None), reverse=True)
    if len(scored) < 2 or scored[0][0] == scored[1][0]:
        return None
    return scored[0][1]


def per_prompt_rows(table: ScoreTable) -> Iterator[dict]:
    """One object per prompt: id, prompt, each system's score and samples, the winner."""
    for row in table.prompts:
        scores = prompt_scores(row)
        yield {"id": row.id, "prompt": row.prompt,
               "scores": dict(zip(table.systems, scores)),
               "samples": {s: [{"path": x.path, "score": x.score, "error": x.error} for x in samples]
                           for s, samples in zip(table.systems, row.samples)},
               "winner": winner(table.systems, scores)}


def write_per_prompt(table: ScoreTable, stream: IO[str]) -> None:
    """per_prompt_rows as JSON Lines."""
    stream.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in per_prompt_rows(table)))


__all__ = ["LAYOUTS", "Slot", "Excluded", "Comparison", "detect_layout", "plan_comparison", "Sample",
           "PromptScores", "ScoreTable", "collect_scores", "SystemStats", "PairStats", "BestOfK",
           "CompareResult", "compare", "sign_test", "bootstrap_means", "print_table", "win_matrix", "to_json",
           "csv_rows", "write_csv", "per_prompt_rows", "write_per_prompt", "prompt_scores", "winner"]
