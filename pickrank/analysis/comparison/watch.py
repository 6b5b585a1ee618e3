"""Signals beside the score, for watching a training run (or any comparison): per system the image statistics'
means, the diversity of its samples, an optional held-out scorer, each with a paired bootstrap interval over the
prompts (the same resamples as the scores'), and flags where PickScore rises while a signal moves past its threshold.

Flags are hints: they never change a score. Their thresholds (`DEFAULT_THRESHOLDS`) are relative changes against
the baseline (a series' first checkpoint), settable with `compare --flag NAME=PERCENT`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from pickrank.analysis.comparison.stats import (
    DEFAULT_CONFIDENCE,
    Columns,
    CompareResult,
    ScoreTable,
    finite_or_none,
)
from pickrank.core.kept import Kept
from pickrank.errors import UsageError
from pickrank.inputs.imagestats import STAT_NAMES
from pickrank.records import Record

# Diversity is a signal as the statistics are; the held-out scorer's flag has no threshold (its interval decides).
SIGNAL_NAMES: tuple[str, ...] = (*STAT_NAMES, "diversity")
MONITOR = "monitor"
# Relative change against the baseline past which a flag is raised while PickScore rises (sign: the direction).
DEFAULT_THRESHOLDS: dict[str, float] = {"saturation": 0.25, "brightness": 0.15, "contrast": 0.25,
                                        "colourfulness": 0.25, "sharpness": -0.30, "hf_energy": 0.50,
                                        "diversity": -0.30}


def parse_thresholds(specs: Sequence[str]) -> dict[str, float | None]:
    """DEFAULT_THRESHOLDS with `--flag NAME=PERCENT` applied (PERCENT like +25, -30 or 25%; `off` turns the flag
    off); UsageError for an unknown name or value."""
    out: dict[str, float | None] = dict(DEFAULT_THRESHOLDS)
    for spec in specs:
        name, sep, value = (t.strip() for t in spec.partition("="))
        if not sep or name not in SIGNAL_NAMES:
            raise UsageError(f"--flag {spec!r}: give NAME=PERCENT (e.g. saturation=+25) with NAME one of "
                             f"{', '.join(SIGNAL_NAMES)}")
        if value.lower() == "off":
            out[name] = None
            continue
        try:
            pct = float(value.rstrip("%"))
        except ValueError:
            raise UsageError(f"--flag {spec!r}: {value!r} is not a percentage (like +25 or -30) or off") from None
        if pct == 0 or not np.isfinite(pct):
            raise UsageError(f"--flag {spec!r}: the threshold must be a non-zero percentage")
        out[name] = pct / 100.0
    return out


@dataclass(frozen=True)
class Estimate:
    """A mean over prompts with its bootstrap interval (low/high None without one), and how many prompts count."""

    mean: float | None
    low: float | None
    high: float | None
    prompts: int


@dataclass(frozen=True)
class SystemSignals:
    """One system's signals: each of SIGNAL_NAMES (diversity: within a prompt's samples), the diversity across
    all its images, and the held-out score with its paired difference against the baseline."""

    name: str
    signals: tuple[tuple[str, Estimate], ...]
    diversity_all: float | None
    monitor: Estimate | None = None
    monitor_diff: Estimate | None = None

    def get(self, name: str) -> Estimate | None:
        """The named signal's estimate (None when not computed)."""
        return dict(self.signals).get(name)


@dataclass(frozen=True)
class Flag:
    """A hint of reward hacking: `system`'s PickScore rises against the baseline while `signal` moves by
    `change` (relative; None for the held-out score, whose interval decides), past `threshold`."""

    system: str
    signal: str
    change: float | None
    threshold: float | None
    text: str


@dataclass(frozen=True)
class Watch:
    """The signals of a comparison: per system, the flags, the thresholds used, and the held-out model's name."""

    systems: tuple[SystemSignals, ...]
    flags: tuple[Flag, ...]
    thresholds: tuple[tuple[str, float | None], ...]
    baseline: str
    monitor_model: str | None = None
    series: bool = False

    def system(self, name: str) -> SystemSignals:
        """The named system's signals."""
        return next(s for s in self.systems if s.name == name)


def mean_cosine_distance(emb: np.ndarray) -> float | None:
    """Mean of 1 - cos over the distinct pairs of rows of (n, D) L2-normalised embeddings; None for n < 2."""
    n = len(emb)
    if n < 2:
        return None
    e = emb.astype(np.float64)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    s = e.sum(axis=0)
    # sum over i != j of cos(i, j) = |sum e|^2 - n, without the n x n matrix
    return float(1.0 - (s @ s - n) / (n * (n - 1)))


def _group_means(prompt_of: list[int], values: list, n: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt (0..n-1) the mean of its rows of `values` (n, width), and which prompts have any."""
    counts = np.bincount(np.asarray(prompt_of, dtype=np.int64), minlength=n)
    sums = np.zeros((n, width))
    if prompt_of:
        np.add.at(sums, np.asarray(prompt_of), np.asarray(values, dtype=np.float64).reshape(-1, width))
    has = counts > 0
    return sums / np.maximum(counts, 1)[:, None], has


class _Samples:
    """A system's per-prompt figures: the mean of each statistic and of the held-out score over its samples (with
    which prompts have them), and its samples' embeddings per prompt (for diversity)."""

    def __init__(self, table: ScoreTable, kept: Kept, monitor: Mapping[str, float] | None, s: int) -> None:
        n = len(table.prompts)
        stat_at, stats, mon_at, mon = [], [], [], []
        self.emb: list[np.ndarray] = []
        for i, row in enumerate(table.prompts):
            embs = []
            for x in row.samples[s]:
                if x.score is None or x.path is None:
                    continue
                st, e = kept.stats_of(x.path), kept.embedding(x.path)
                if st is not None:
                    stat_at.append(i)
                    stats.append(st.values())
                if e is not None:
                    embs.append(e)
                v = monitor.get(os.path.normpath(x.path)) if monitor is not None else None
                if v is not None:
                    mon_at.append(i)
                    mon.append(v)
            self.emb.append(np.array(embs))
        self.stats, self.has_stats = _group_means(stat_at, stats, n, len(STAT_NAMES))
        self.monitor, self.has_monitor = _group_means(mon_at, mon, n, 1)
        self.monitor = self.monitor[:, 0]
        diversity = [mean_cosine_distance(e) for e in self.emb]
        self.diversity = np.array([0.0 if d is None else d for d in diversity])
        self.has_diversity = np.array([d is not None for d in diversity])

    def all_embeddings(self) -> np.ndarray:
        """Every sample's embedding, all prompts together."""
        return np.concatenate([e for e in self.emb if len(e)]) if any(len(e) for e in self.emb) else np.empty(0)


def watch_signals(table: ScoreTable, result: CompareResult, kept: Kept, *,
                  monitor: Mapping[str, float] | None = None, monitor_model: str | None = None,
                  thresholds: Mapping[str, float | None] | None = None, series: bool = False) -> Watch:
    """Every system's signals over the table's prompts (bootstrapped as `result` was: same resamples), and the
    flags against the baseline. `monitor`: the held-out scorer's score per image path (CLIPScore)."""
    thresholds = dict(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
    samples = [_Samples(table, kept, monitor, s) for s in range(len(table.systems))]
    b = samples[table.systems.index(result.baseline)]
    cols = Columns(len(table.prompts))
    index: list[dict[str, int]] = []
    for sm in samples:
        at = {name: cols.add(sm.stats[:, j], sm.has_stats) for j, name in enumerate(STAT_NAMES)}
        at["diversity"] = cols.add(sm.diversity, sm.has_diversity)
        if monitor is not None:
            at[MONITOR] = cols.add(sm.monitor, sm.has_monitor)
            at["monitor_diff"] = cols.add(sm.monitor - b.monitor, sm.has_monitor & b.has_monitor)
        index.append(at)
    point, low, high = cols.estimates(result.bootstrap, result.seed, result.confidence or DEFAULT_CONFIDENCE)
    counts = [int(m.sum()) for m in cols.masks]

    def est(c: int) -> Estimate:
        return Estimate(finite_or_none(point[c]), finite_or_none(low[c]), finite_or_none(high[c]), counts[c])

    systems = tuple(SystemSignals(
        name, tuple((n, est(at[n])) for n in SIGNAL_NAMES), mean_cosine_distance(sm.all_embeddings()),
        est(at[MONITOR]) if MONITOR in at else None, est(at["monitor_diff"]) if "monitor_diff" in at else None)
        for name, sm, at in zip(table.systems, samples, index))
    flags = tuple(raise_flags(systems, result, thresholds))
    return Watch(systems, flags, tuple(thresholds.items()), result.baseline, monitor_model, series)


def relative_change(value: float | None, reference: float | None) -> float | None:
    """(value - reference) / |reference|; None when either is missing or the reference is 0."""
    if value is None or reference is None or reference == 0:
        return None
    return (value - reference) / abs(reference)


def raise_flags(systems: Sequence[SystemSignals], result: CompareResult,
                thresholds: Mapping[str, float | None]) -> list[Flag]:
    """One flag per (system, signal) where the system's PickScore rises against the baseline (its mean difference
    is above 0) while the signal moves past its threshold, or the held-out score falls with an interval that
    excludes zero."""
    base = next(s for s in systems if s.name == result.baseline)
    flags = []
    for s in systems:
        pair = result.pair(s.name, result.baseline)
        if s.name == result.baseline or pair is None or pair.mean_diff is None or pair.mean_diff <= 0:
            continue
        rise = f"PickScore {pair.mean_diff:+.3g} vs {result.baseline}"
        for name, threshold in thresholds.items():
            est, ref = s.get(name), base.get(name)
            change = relative_change(est.mean if est else None, ref.mean if ref else None)
            if threshold is None or change is None:
                continue
            if (threshold > 0 and change >= threshold) or (threshold < 0 and change <= threshold):
                flags.append(Flag(s.name, name, change, threshold,
                                  f"{s.name}: {name} {change:+.0%} vs {result.baseline} (threshold "
                                  f"{threshold:+.0%}) while {rise}"))
        d = s.monitor_diff
        if d is not None and d.high is not None and d.high < 0:
            flags.append(Flag(s.name, MONITOR, None, None,
                              f"{s.name}: held-out score {d.mean:+.3g} [{d.low:.3g}, {d.high:.3g}] vs "
                              f"{result.baseline} (interval below zero) while {rise}"))
    return flags


def monitor_scores(records: Sequence[Record]) -> dict[str, float]:
    """The held-out scorer's CLIPScore per image path, 100 * max(cos, 0), from records scored with --scale cosine."""
    return {os.path.normpath(r.path): 100.0 * max(float(r.score), 0.0) for r in records
            if r.path is not None and r.score is not None and r.error is None}


__all__ = ["SIGNAL_NAMES", "DEFAULT_THRESHOLDS", "MONITOR", "parse_thresholds",
           "Estimate", "SystemSignals", "Flag", "Watch", "mean_cosine_distance", "watch_signals",
           "relative_change", "raise_flags", "monitor_scores"]
