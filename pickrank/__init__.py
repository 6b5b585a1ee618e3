"""pickrank: rank AI-generated images by predicted human preference with PickScore_v1."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["PickScorer", "__version__"]


def __getattr__(name: str):
    # Lazy: importing pickrank (and `pickrank --help`) must not import torch.
    if name == "PickScorer":
        from pickrank.api import PickScorer

        return PickScorer
    raise AttributeError(name)
