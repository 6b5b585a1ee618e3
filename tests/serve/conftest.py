"""What the server's tests share: the in-process scorer whose scores the server's answers must equal."""

from __future__ import annotations

from pathlib import Path

import pytest

from pickrank.api import PickScorer


@pytest.fixture(scope="module")
def scorer(model_dir: Path) -> PickScorer:
    return PickScorer.from_pretrained(str(model_dir))
