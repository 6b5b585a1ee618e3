"""The comparison's statistics: the score table (every system's sample scores per prompt), then per system its
mean with a bootstrap interval, per pair the win rate, mean difference, preference probability and sign test,
and the best-of-k curves (numpy only, vectorised; one paired bootstrap over prompts for every estimate)."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from pickrank.analysis.comparison.plan import Comparison, Excluded
from pickrank.errors import UsageError
from pickrank.records import Record

DEFAULT_BOOTSTRAP = 10_000
DEFAULT_SEED = 0
DEFAULT_CONFIDENCE = 0.95
# Below these a percentile bootstrap interval is not to be trusted (README, "Comparing systems"): over few prompts
# it can be no wider than their own spread (one prompt: [x, x]) and covers less than it says; with few resamples
# its ends are noise themselves (they may even miss the estimate). Such intervals are marked, in every format.
MIN_PROMPTS = 20
MIN_BOOTSTRAP = 1000


def interval_caveat(prompts: int, bootstrap: int) -> str | None:
    """Why an interval over `prompts` prompts from `bootstrap` resamples is unreliable; None when it is not (or
    when there is no interval: bootstrap 0)."""
    if bootstrap <= 0:
        return None
    why = ([f"{prompts} prompt(s), under {MIN_PROMPTS}"] if prompts < MIN_PROMPTS else []) + \
          ([f"{bootstrap} resample(s), under {MIN_BOOTSTRAP}"] if bootstrap < MIN_BOOTSTRAP else [])
    return "; ".join(why) or None


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
    caveat: str | None = None  # why its interval is unreliable (`interval_caveat`), None when it is not


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
    caveat: str | None = None  # why its intervals are unreliable (`interval_caveat`), None when they are not


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
    caveat: str | None = None  # why its intervals are unreliable (`interval_caveat`), None when they are not


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
                     p.p_value, one_minus(p.sample_win_rate), one_minus(p.sample_high), one_minus(p.sample_low),
                     p.caveat)


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


def bootstrap_bytes(bootstrap: int, columns: int) -> int:
    """About the most memory the bootstrap of `columns` statistics takes: the (bootstrap, columns) float64
    resampled means, and the copies the percentiles sort."""
    return 3 * 8 * bootstrap * max(columns, 1)


def check_bootstrap(bootstrap: int, columns: int) -> None:
    """A UsageError, before any image is scored, when the bootstrap of `columns` statistics cannot fit in this
    machine's memory (half of it: the model and the images need the rest)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not told (Windows): left to the bootstrap itself
        return
    need = bootstrap_bytes(bootstrap, columns)
    if need > memory // 2:
        most = max(0, (memory // 2) // bootstrap_bytes(1, columns))
        raise UsageError(f"--bootstrap {bootstrap}: the intervals of {columns} statistics would take about "
                         f"{need / 1e9:,.1f} GB, over half this machine's memory ({memory / 1e9:.1f} GB); "
                         f"give at most {most:,}")


def _pairs(systems: Sequence[str], baseline: str, all_pairs: bool) -> list[tuple[int, int]]:
    """(system, reference) indices: each against the baseline; with all_pairs every pair, the earlier system
    (baseline first) as reference."""
    order = [systems.index(baseline)] + [i for i in range(len(systems)) if systems[i] != baseline]
    if not all_pairs:
        return [(j, order[0]) for j in order[1:]]
    return [(order[j], order[i]) for i in range(len(order)) for j in range(i + 1, len(order))]


def _opt(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def compare_systems(table: ScoreTable, *, baseline: str | None = None, all_pairs: bool = False,
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
    check_bootstrap(bootstrap, len(cols.values))
    point, low, high = cols.estimates(bootstrap, seed, confidence)
    est = (lambda c: (_opt(point[c]), _opt(low[c]), _opt(high[c])))
    systems = tuple(_system_stats(table, s, est(sys_cols[s]), bootstrap) for s in range(len(table.systems)))
    pair_stats = tuple(_pair_stats(table, a, b, means, samples, [est(c) for c in pc], bootstrap)
                       for (a, b), pc in zip(pairs, pair_cols))
    curves = tuple(BestOfK(table.systems[x], table.systems[y], n, tuple(range(1, len(cs) + 1)),
                           tuple(float(point[c]) for c in cs), tuple(_opt(low[c]) for c in cs),
                           tuple(_opt(high[c]) for c in cs), interval_caveat(n, bootstrap))
                   for x, y, n, cs in curve_cols)
    return CompareResult(systems, pair_stats, curves, baseline, len(table.prompts), all_pairs, bootstrap, seed,
                         confidence, table.layout, table.excluded)


def _system_stats(table: ScoreTable, s: int, est: tuple, bootstrap: int) -> SystemStats:
    scored = [sum(x.score is not None for x in row.samples[s]) for row in table.prompts]
    failed = sum(x.score is None for row in table.prompts for x in row.samples[s])
    missing = tuple(row.id for row, n in zip(table.prompts, scored) if n == 0)
    prompts = sum(n > 0 for n in scored)
    return SystemStats(table.systems[s], *est, prompts=prompts, images=sum(scored), failed=failed, missing=missing,
                       caveat=interval_caveat(prompts, bootstrap) if est[1] is not None else None)


def _pair_stats(table: ScoreTable, a: int, b: int, means: list[np.ndarray], samples: list[np.ndarray],
                ests: list[tuple], bootstrap: int) -> PairStats:
    mask = ~np.isnan(means[a]) & ~np.isnan(means[b])
    d = (means[a] - means[b])[mask]
    wins, losses = int(np.sum(d > 0)), int(np.sum(d < 0))
    several = max(np.sum(~np.isnan(samples[a][mask]), 1).max(initial=0),
                  np.sum(~np.isnan(samples[b][mask]), 1).max(initial=0)) > 1
    sample = ests[3] if several else (None, None, None)
    caveat = interval_caveat(int(mask.sum()), bootstrap) if ests[0][1] is not None else None
    return PairStats(table.systems[a], table.systems[b], int(mask.sum()), wins, int(d.size - wins - losses),
                     losses, *ests[0], *ests[1], *ests[2], sign_test(wins, losses), *sample, caveat=caveat)


__all__ = ["DEFAULT_BOOTSTRAP", "DEFAULT_SEED", "DEFAULT_CONFIDENCE", "Sample", "PromptScores", "ScoreTable",
           "collect_scores", "SystemStats", "PairStats", "BestOfK", "CompareResult", "compare_systems", "sign_test",
           "bootstrap_means", "MIN_PROMPTS", "MIN_BOOTSTRAP", "interval_caveat", "bootstrap_bytes", "check_bootstrap"]
