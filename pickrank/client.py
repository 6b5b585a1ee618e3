"""`pickrank.client.RemoteScorer`: PickScorer.score over HTTP (the code lives in `pickrank.serve.client`)."""

from pickrank.serve.client import RemoteScorer

__all__ = ["RemoteScorer"]
