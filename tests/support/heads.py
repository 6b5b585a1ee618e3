"""A preference head for the tiny model without fitting one: random numbers, written as `pickrank tune` writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pickrank.inputs.decode import ImageSpec
from pickrank.models.source import resolve_source
from pickrank.taste.head import HeadParams, base_weights, head_metadata, write_head


def random_head(model_dir: Path, path: Path, seed: int = 0, rank: int = 1) -> Path:
    """A head on `model_dir` (default --alpha and --decode) whose correction moves scores by about a unit."""
    dim = json.loads((model_dir / "config.json").read_text())["projection_dim"]
    rng = np.random.default_rng(seed)
    params = HeadParams(1.2, rng.normal(size=(rank + 1, dim)).astype(np.float32),
                        rng.normal(size=(rank, dim)).astype(np.float32), rng.normal(size=dim).astype(np.float32))
    meta = head_metadata(str(model_dir), ImageSpec(), base_weights("torch", resolve_source(str(model_dir))),
                         {"labels": 0})
    write_head(str(path), params, meta)
    return path
