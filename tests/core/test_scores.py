"""The score math: scale * cosine, softmax over the set, ranks."""

from __future__ import annotations

import torch

from pickrank.core.scores import pick_scores, ranks, softmax_probs


def test_pick_scores_is_scaled_cosine():
    t = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    i = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    s = pick_scores(t, i, 100.0)
    assert s.shape == (2, 3)
    assert torch.allclose(s[1, 2], 100.0 * torch.nn.functional.cosine_similarity(t[1], i[2], dim=0), atol=1e-4)


def test_softmax_and_ranks():
    p = softmax_probs(torch.tensor([21.0, 23.0, 22.0]))
    assert abs(float(p.sum()) - 1) < 1e-6 and int(p.argmax()) == 1
    assert ranks([21.0, 23.0, 22.0]) == [3, 1, 2]
    assert ranks([5.0, 5.0, 1.0]) == [1, 2, 3]  # ties keep input order
    assert ranks([]) == []
