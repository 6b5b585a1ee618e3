"""What a run with image statistics (`RunOptions.signals`) keeps for its caller: each image's embedding and
statistics by content key, and each path's key (compare's signals: diversity from the embeddings, the statistics
beside the score)."""

from __future__ import annotations

import os

import numpy as np

from pickrank.inputs.imagestats import ImageStats


class Kept:
    """Embeddings (float32, L2-normalised) and `ImageStats` by content key, and the key each path was read as."""

    def __init__(self) -> None:
        self.embeddings: dict[str, np.ndarray] = {}
        self.stats: dict[str, ImageStats] = {}
        self.keys: dict[str, str] = {}

    def name(self, path: str, key: str) -> None:
        """`path` was read as content `key`."""
        self.keys[os.path.normpath(path)] = key

    def put(self, key: str, embedding: np.ndarray, stats: ImageStats | None) -> None:
        """An image resolved (embedded, or from the cache) with its statistics."""
        self.embeddings[key] = np.asarray(embedding, dtype=np.float32)
        if stats is not None:
            self.stats[key] = stats

    def embedding(self, path: str) -> np.ndarray | None:
        """The embedding of the image read from `path`, None when it has none (it failed)."""
        key = self.keys.get(os.path.normpath(path))
        return None if key is None else self.embeddings.get(key)

    def stats_of(self, path: str) -> ImageStats | None:
        """The statistics of the image read from `path`, None when it has none."""
        key = self.keys.get(os.path.normpath(path))
        return None if key is None else self.stats.get(key)


__all__ = ["Kept"]
