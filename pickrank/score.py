"""Pure math: PickScore from normalised embeddings, softmax over a candidate set, ranks."""

from __future__ import annotations

import torch


def pick_scores(text: torch.Tensor, images: torch.Tensor, scale: float) -> torch.Tensor:
    """exp(logit_scale) * cos(text, image) for every prompt x image: (P, D), (N, D) -> (P, N), fp32."""
    return scale * (text.float() @ images.float().T)


def softmax_probs(scores: torch.Tensor) -> torch.Tensor:
    """Preference probabilities over one candidate set, as the model card computes them."""
    return torch.softmax(scores.float(), dim=-1)


def ranks(scores: list[float]) -> list[int]:
    """1-based ranks, best first; ties keep input order."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    out = [0] * len(scores)
    for r, i in enumerate(order, start=1):
        out[i] = r
    return out


def pick_score(text: torch.Tensor, image: torch.Tensor, scale: float) -> float:
    """One prompt against one image, from 1-D normalised embeddings: scale * cos, as a float (eval's pairs)."""
    return float(scale * (text @ image))


def paired_scores(text: torch.Tensor, images: torch.Tensor, scale: float) -> torch.Tensor:
    """Row i of `text` against row i of `images`: (N, D), (N, D) -> (N,) (PickScorer.score)."""
    return scale * (text * images).sum(-1)
