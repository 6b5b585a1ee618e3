"""Fitting a preference head on frozen PickScore embeddings: Bradley-Terry on the pair's score difference (ties as
0.5), L2 regularisation chosen by k-fold cross-validation over prompts, and held-out accuracy by nested
cross-validation (each held-out pair is predicted by a head that never saw its prompt, regularisation chosen
without it), with a paired bootstrap of the difference to PickScore alone.

Fits work in a few coordinates, computed once from the embeddings alone (no label): the images' first principal
directions (the head's image term lies in their span; a taste along directions the images hardly vary in cannot be
learnt from them anyway) and, for the interaction, the prompts' first principal directions. In those the loss is
convex, so Newton's method finds its one optimum in a few steps, warm-started along the regularisation path (numpy,
no torch). No labels, or regularisation that wins, give the head that is PickScore (a = 1, W = 0).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from pickrank.taste.head import HeadParams

# Regularisation strengths tried (per pair, on features of unit mean square), strong to weak; `inf` stands for
# PickScore alone.
LAMBDAS: tuple[float, ...] = (float("inf"), 1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 3e-4, 1e-4)
DEFAULT_FOLDS = 5
DEFAULT_RANK = 0
IMAGE_DIRECTIONS = 64  # principal directions of the images a fit works in (all of them in a smaller embedding)
MAX_NEWTON = 50


@dataclass(frozen=True)
class PairData:
    """Labelled pairs as arrays: prompt and image embeddings (normalised, fp32) and, per pair, indices into them and
    the label (0: image_0 preferred, 1: image_1, 0.5: a tie); `labeler` indexes `labelers`."""

    text: np.ndarray  # (P, D)
    images: np.ndarray  # (M, D)
    prompt: np.ndarray  # (N,) int
    image_0: np.ndarray  # (N,) int
    image_1: np.ndarray  # (N,) int
    label: np.ndarray  # (N,) float
    labeler: np.ndarray  # (N,) int
    labelers: tuple[str, ...]
    scale: float  # exp(logit_scale): raw = scale * cos

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def subset(self, idx: np.ndarray) -> "PairData":
        """The pairs `idx` (embeddings shared)."""
        return replace(self, prompt=self.prompt[idx], image_0=self.image_0[idx], image_1=self.image_1[idx],
                       label=self.label[idx], labeler=self.labeler[idx])

    def raw_difference(self) -> np.ndarray:
        """PickScore's score_0 - score_1 per pair."""
        dx = self.images[self.image_0] - self.images[self.image_1]
        return self.scale * np.einsum("nd,nd->n", self.text[self.prompt], dx).astype(np.float32)


@dataclass(frozen=True)
class Basis:
    """The coordinates fits are made in: the images' first principal directions (k of them, orthonormal), the
    spread of the image differences and of PickScore's differences along them (so that one penalty treats every
    number alike), and r text directions with their mean (each coordinate of unit variance over the prompts).
    Made from the embeddings and PickScore alone, never from the labels."""

    image_basis: np.ndarray  # (k, D)
    x_scale: float
    raw_scale: float
    text_mean: np.ndarray  # (D,)
    text_basis: np.ndarray  # (r, D)

    @property
    def width(self) -> int:
        """How many numbers a fit in this basis has: PickScore's factor, then (r+1) x k."""
        return 1 + (self.text_basis.shape[0] + 1) * self.image_basis.shape[0]

    def params(self, theta: np.ndarray) -> HeadParams:
        """The head of a fit's numbers: a = 1 + theta_0 / raw_scale, W = V @ image_basis / x_scale."""
        v = theta[1:].reshape(self.text_basis.shape[0] + 1, self.image_basis.shape[0])
        return HeadParams(float(1.0 + theta[0] / self.raw_scale),
                          (v @ self.image_basis / self.x_scale).astype(np.float32),
                          self.text_basis.astype(np.float32), self.text_mean.astype(np.float32))


def _principal(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k principal directions of `rows` (centred; rank-deficient ones left out) and their spreads."""
    centred = (rows - rows.mean(0)).astype(np.float64)
    cov = centred.T @ centred / max(len(rows), 1)  # D x D: cheaper than an SVD of many rows
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    values, vectors = np.clip(values[order], 0, None), vectors[:, order]
    keep = min(k, int((values > 1e-12 * max(values[0] if len(values) else 0.0, 1e-30)).sum()))
    return vectors[:, :keep].T, np.sqrt(values[:keep])


def make_basis(data: PairData, rank: int = DEFAULT_RANK, k: int = IMAGE_DIRECTIONS) -> Basis:
    """The coordinates of fits on these pairs (see `Basis`)."""
    used = np.unique(np.concatenate([data.image_0, data.image_1]))
    image_basis, _ = _principal(data.images[used], k)
    prompts = data.text[np.unique(data.prompt)]
    dim = data.text.shape[1]
    text_basis = np.zeros((0, dim))
    if rank > 0 and len(prompts) > 1:
        directions, sd = _principal(prompts, rank)
        text_basis = directions / sd[:, None]
    text_basis = np.concatenate([text_basis, np.zeros((rank - len(text_basis), dim))])
    dx = (data.images[data.image_0] - data.images[data.image_1]) @ image_basis.T
    x_scale = float(np.sqrt(np.mean(np.einsum("nk,nk->n", dx, dx)))) or 1.0
    raw_scale = float(np.sqrt(np.mean(data.raw_difference().astype(np.float64) ** 2))) or 1.0
    return Basis(image_basis, x_scale, raw_scale, prompts.mean(0).astype(np.float64), text_basis)


@dataclass(frozen=True)
class Problem:
    """Pairs in a basis: their features (N, width), PickScore's differences (N,) that every fit starts from, and
    the probability (N,) that image_0 is preferred (1 - label)."""

    features: np.ndarray
    raw: np.ndarray
    target: np.ndarray
    basis: Basis

    def rows(self, idx: np.ndarray) -> "Problem":
        return Problem(self.features[idx], self.raw[idx], self.target[idx], self.basis)

    def differences(self, theta: np.ndarray) -> np.ndarray:
        """The tuned score_0 - score_1 of the pairs under a fit's numbers."""
        return self.raw + self.features @ theta


def problem(data: PairData, rank: int = DEFAULT_RANK, k: int = IMAGE_DIRECTIONS) -> Problem:
    """The pairs' features in their basis, computed once for every fit."""
    basis = make_basis(data, rank, k)
    raw = data.raw_difference().astype(np.float64)
    z = (data.images[data.image_0] - data.images[data.image_1]).astype(np.float64) @ basis.image_basis.T
    z /= basis.x_scale
    phi = (data.text[data.prompt].astype(np.float64) - basis.text_mean) @ basis.text_basis.T
    features = np.concatenate([(raw / basis.raw_scale)[:, None], z,
                               *(phi[:, j:j + 1] * z for j in range(phi.shape[1]))], axis=1)
    return Problem(features, raw, 1.0 - data.label.astype(np.float64), basis)


def _loss(p: Problem, theta: np.ndarray, lam: float) -> float:
    d = p.differences(theta)
    return float(np.mean(np.logaddexp(0, d) - p.target * d) + lam * theta @ theta)


def fit(p: Problem, lam: float, start: np.ndarray | None = None) -> np.ndarray:
    """The numbers minimising mean Bradley-Terry loss + lam * |theta|^2 over the pairs (lam = inf: PickScore), by
    Newton's method with a backtracking line search (the loss is strictly convex for lam > 0: one optimum)."""
    theta = np.zeros(p.basis.width) if start is None else start.copy()
    if not np.isfinite(lam) or len(p.raw) == 0:
        return np.zeros(p.basis.width)
    n, width = p.features.shape
    for _ in range(MAX_NEWTON):
        prob = 0.5 * (1 + np.tanh(p.differences(theta) / 2))  # the sigmoid, without overflow
        grad = p.features.T @ (prob - p.target) / n + 2 * lam * theta
        if np.abs(grad).max() < 1e-9:
            break
        hess = p.features.T @ (p.features * (prob * (1 - prob))[:, None]) / n + 2 * lam * np.eye(width)
        step = np.linalg.solve(hess, grad)
        before, t = _loss(p, theta, lam), 1.0
        while t > 1e-6 and _loss(p, theta - t * step, lam) > before - 1e-4 * t * (grad @ step):
            t /= 2
        theta = theta - t * step
        if t * np.abs(step).max() < 1e-10:
            break
    return theta


def bt_loss(differences: np.ndarray, label: np.ndarray) -> float:
    """Mean Bradley-Terry loss (binary cross-entropy of sigmoid(score_0 - score_1) against 1 - label)."""
    d = np.asarray(differences, dtype=np.float64)
    y = 1.0 - np.asarray(label, dtype=np.float64)
    return float(np.mean(np.logaddexp(0, d) - y * d))


def credits(differences: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Each pair's credit by the paper's protocol as `pickrank eval` computes it (tie threshold 0)."""
    from pickrank.analysis.evaluate import credit, pair_probs, predict

    return np.array([credit(float(lab), predict(*pair_probs(d, 0.0), 0.0)) for d, lab in zip(differences, label)])


# -- cross-validation ------------------------------------------------------------------------------------------

def folds_by_prompt(prompt: np.ndarray, k: int, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """k folds of pair indices that never split a prompt's pairs (with fewer prompts than k, one fold per prompt),
    and what the folds are made of: "prompts", or "pairs" when fewer than 3 prompts leave no other way to hold
    pairs out (nested cross-validation needs 3 folds)."""
    rng = np.random.default_rng(seed)
    prompts = np.unique(prompt)
    if len(prompts) < 3:
        order = rng.permutation(len(prompt))
        return [np.sort(part) for part in np.array_split(order, min(k, len(prompt)))], "pairs"
    k = min(k, len(prompts))
    counts = {int(p): int((prompt == p).sum()) for p in prompts}
    load = np.zeros(k)
    fold_of: dict[int, int] = {}
    for p in sorted((int(x) for x in rng.permutation(prompts)), key=lambda p: -counts[p]):  # largest first
        fold_of[p] = int(load.argmin())  # to the lightest fold
        load[fold_of[p]] += counts[p]
    which = np.array([fold_of[int(p)] for p in prompt])
    return [np.flatnonzero(which == i) for i in range(k)], "prompts"


def _path(p: Problem, train: np.ndarray, lambdas: Sequence[float]) -> list[np.ndarray]:
    """Fits on `train` at each lambda, strong to weak, each warm-started from the one before."""
    tr, out, theta = p.rows(train), [], None
    for lam in lambdas:
        theta = fit(tr, lam, theta)
        out.append(theta)
    return out


def _losses(p: Problem, fold: np.ndarray, thetas: list[np.ndarray]) -> np.ndarray:
    """Each fit's mean Bradley-Terry loss on the pairs of `fold`."""
    te = p.rows(fold)
    return np.array([bt_loss(te.differences(t), 1.0 - te.target) for t in thetas])


def _without(folds: list[np.ndarray], *skip: int) -> np.ndarray:
    return np.concatenate([f for j, f in enumerate(folds) if j not in skip])


def choose_lambda(p: Problem, folds: list[np.ndarray], lambdas: Sequence[float]) -> tuple[float, dict[str, float]]:
    """The lambda with the least mean held-out loss over `folds` (each held out in turn), and each lambda's loss."""
    losses = sum(_losses(p, f, _path(p, _without(folds, i), lambdas)) * len(f) for i, f in enumerate(folds))
    losses = np.asarray(losses) / sum(len(f) for f in folds)
    return lambdas[int(np.argmin(losses))], {str(lam): float(x) for lam, x in zip(lambdas, losses)}


def heldout_differences(p: Problem, folds: list[np.ndarray], lambdas: Sequence[float],
                        on_step: Callable[[], None] | None = None) -> tuple[np.ndarray, list[float]]:
    """Nested cross-validation: each fold's pairs predicted by a head fitted on the other folds, its lambda chosen
    by cross-validation over those folds alone; the held-out score differences, and each fold's lambda.

    The inner fits of outer folds i and j are the same (all folds but i and j), so each is made once."""
    k = len(folds)
    inner = np.zeros((k, k, len(lambdas)))  # [i, j]: fit without folds i and j, its loss on fold j
    for i in range(k):
        for j in range(i + 1, k):
            thetas = _path(p, _without(folds, i, j), lambdas)
            inner[i, j], inner[j, i] = _losses(p, folds[j], thetas), _losses(p, folds[i], thetas)
            if on_step:
                on_step()
    out, chosen = np.zeros(len(p.raw)), []
    for i, test in enumerate(folds):
        weighted = sum(inner[i, j] * len(folds[j]) for j in range(k) if j != i)
        lam = lambdas[int(np.argmin(weighted))]
        chosen.append(lam)
        out[test] = p.rows(test).differences(fit(p.rows(_without(folds, i)), lam))
    return out, chosen


def paired_bootstrap(head: np.ndarray, base: np.ndarray, clusters: np.ndarray, resamples: int = 1000,
                     seed: int = 0, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of mean(head) - mean(base) over pairs, resampling `clusters` (the pairs of a prompt
    together) with replacement, the same resample for both."""
    if resamples <= 0 or len(head) == 0:
        return None
    ids, cluster = np.unique(clusters, return_inverse=True)
    sums = np.bincount(cluster, weights=np.asarray(head, np.float64) - np.asarray(base, np.float64),
                       minlength=len(ids))
    counts = np.bincount(cluster, minlength=len(ids)).astype(np.float64)
    draws = np.random.default_rng(seed).multinomial(len(ids), np.full(len(ids), 1 / len(ids)), size=resamples)
    diffs = (draws @ sums) / (draws @ counts)
    lo, hi = np.quantile(diffs, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Tuned:
    """A fitted head and its figures: held-out accuracy (nested cross-validation, the paper's protocol) of PickScore
    and of PickScore + head, their difference with a paired bootstrap interval, and per-labeller figures."""

    params: HeadParams
    lam: float  # the regularisation of the head written (inf: PickScore itself)
    folds: int
    fold_unit: str  # "prompts" or "pairs"
    pickscore: float
    head: float
    interval: tuple[float, float] | None  # of head - pickscore
    fold_lambdas: tuple[float, ...]
    labelers: dict[str, dict]

    @property
    def difference(self) -> float:
        return self.head - self.pickscore

    @property
    def beats_pickscore(self) -> bool:
        """Whether the head is better on held-out pairs: the whole interval of the difference above 0 (without an
        interval, the difference itself)."""
        return (self.interval[0] if self.interval else self.difference) > 0


def labeler_figures(data: PairData, head: np.ndarray, base: np.ndarray) -> dict[str, dict]:
    """Per labeller: labels, held-out accuracy of PickScore and of the head on them, and agreement (mean credit)
    with the other labellers on the pairs they also labelled (None when they share none)."""
    from pickrank.analysis.evaluate import credit

    by_pair: dict[tuple, list[tuple[int, float]]] = {}
    for i in range(len(data)):
        key = (int(data.prompt[i]), frozenset((int(data.image_0[i]), int(data.image_1[i]))))
        flip = data.image_0[i] > data.image_1[i]  # the same pair shown the other way round: its label mirrored
        lab = float(data.label[i])
        by_pair.setdefault(key, []).append((int(data.labeler[i]), 1.0 - lab if flip and lab != 0.5 else lab))
    out = {}
    for li, name in enumerate(data.labelers):
        mine = data.labeler == li
        agree = [credit(a, b) for votes in by_pair.values() for who, a in votes if who == li
                 for other, b in votes if other != li]
        out[name] = {"labels": int(mine.sum()), "pickscore": float(base[mine].mean()) if mine.any() else None,
                     "head": float(head[mine].mean()) if mine.any() else None,
                     "agreement": float(np.mean(agree)) if agree else None, "compared": len(agree)}
    return out


def tune_head(data: PairData, folds: int = DEFAULT_FOLDS, rank: int = DEFAULT_RANK, k: int = IMAGE_DIRECTIONS,
              resamples: int = 1000, seed: int = 0, on_step: Callable[[], None] | None = None) -> Tuned:
    """Fit a head on the pairs, and measure it: nested cross-validation over prompts for the held-out figures,
    cross-validation over all the pairs for the head written. BLAS runs on one thread meanwhile (many small
    products: threads only wait on each other, and on a busy machine they spin)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        p = problem(data, rank, k)
        parts, unit = folds_by_prompt(data.prompt, folds, seed)
        tuned, fold_lambdas = heldout_differences(p, parts, LAMBDAS, on_step)
        lam, _ = choose_lambda(p, parts, LAMBDAS)
        params = p.basis.params(fit(p, lam))
    head, base = credits(tuned, data.label), credits(p.raw, data.label)
    clusters = data.prompt if unit == "prompts" else np.arange(len(data))
    return Tuned(params, lam, len(parts), unit, float(base.mean()), float(head.mean()),
                 paired_bootstrap(head, base, clusters, resamples, seed), tuple(fold_lambdas),
                 labeler_figures(data, head, base))


__all__ = ["LAMBDAS", "DEFAULT_FOLDS", "DEFAULT_RANK", "IMAGE_DIRECTIONS", "PairData", "Basis", "make_basis",
           "Problem", "problem", "fit",
           "bt_loss", "credits", "folds_by_prompt", "choose_lambda", "heldout_differences",
           "paired_bootstrap", "Tuned", "labeler_figures", "tune_head"]
