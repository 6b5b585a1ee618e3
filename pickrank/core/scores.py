"""Pure math: PickScore from normalised embeddings, softmax over a candidate set, ranks.

The same functions serve both backends: torch tensors (the torch embedder: computed exactly as before) or numpy
arrays (an ONNX export, in an environment without torch). torch is imported only when a tensor is given.

A preference head (`--head`, `pickrank.taste.head.Head`) is applied here, after the embeddings: every score function
takes the embedder's `head` and, when there is one, returns the tuned score (the raw score without one). The
embedding cache never sees it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Union

import numpy as np

if TYPE_CHECKING:
    import torch

Array = Union["torch.Tensor", np.ndarray]


class ScoreHead(Protocol):
    """A correction of PickScore learnt from labels: the tuned score from the raw one and both embeddings."""

    def tuned(self, raw: Array, text: Array, images: Array, paired: bool) -> Array:
        """Tuned scores of `images` against `text`: every prompt x image (P, N) from raw (P, N), text (P, D) and
        images (N, D); with `paired`, row i against row i (N,) from raw (N,), text (N, D), images (N, D)."""

    def describe(self) -> dict:
        """What the provenance says of it: its file and SHA-256, its form and what it was fitted on."""


def is_tensor(x: object) -> bool:
    """Whether x is a torch tensor, told without importing torch (an ONNX run has none)."""
    return type(x).__module__.split(".")[0] == "torch"


def as_array(x: object, backend: str) -> Array:
    """Embeddings or scores in the backend's kind of array: a torch tensor for "torch", else a numpy array."""
    if backend == "torch":
        import torch

        return torch.as_tensor(x)
    return np.asarray(x)


def _f32(x: Array) -> Array:
    return x.float() if is_tensor(x) else np.asarray(x, dtype=np.float32)


def pick_scores(text: Array, images: Array, scale: float, head: ScoreHead | None = None) -> Array:
    """exp(logit_scale) * cos(text, image) for every prompt x image: (P, D), (N, D) -> (P, N), fp32 (tuned by
    `head` when there is one)."""
    raw = scale * (_f32(text) @ _f32(images).T)
    return raw if head is None else head.tuned(raw, _f32(text), _f32(images), paired=False)


def softmax_probs(scores: Array) -> Array:
    """Preference probabilities over one candidate set, as the model card computes them."""
    if is_tensor(scores):
        import torch

        return torch.softmax(scores.float(), dim=-1)
    x = np.asarray(scores, dtype=np.float32)
    e = np.exp(x - x.max(axis=-1, keepdims=True))  # shifted: exp of a raw score (~20-30) stays finite
    return e / e.sum(axis=-1, keepdims=True)


def stack(rows: list[Array]) -> Array:
    """Rows of one kind stacked into a matrix (torch.stack or np.stack)."""
    if rows and is_tensor(rows[0]):
        import torch

        return torch.stack(rows)
    return np.stack(rows)


def ranks(scores: list[float]) -> list[int]:
    """1-based ranks, best first; ties keep input order."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    out = [0] * len(scores)
    for r, i in enumerate(order, start=1):
        out[i] = r
    return out


def pick_score(text: Array, image: Array, scale: float, head: ScoreHead | None = None) -> float:
    """One prompt against one image, from 1-D normalised embeddings: scale * cos, as a float (eval's pairs)."""
    if head is None:
        return float(scale * (text @ image))
    return float(paired_scores(text[None], image[None], scale, head)[0])


def paired_scores(text: Array, images: Array, scale: float, head: ScoreHead | None = None) -> Array:
    """Row i of `text` against row i of `images`: (N, D), (N, D) -> (N,) (PickScorer.score)."""
    raw = scale * (text * images).sum(-1)
    return raw if head is None else head.tuned(raw, text, images, paired=True)
