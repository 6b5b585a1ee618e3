"""`pickrank cache clear` without --model asks first on a terminal (--yes skips it); a script is not asked."""

from __future__ import annotations

import os

from pickrank.cli.app import app
from pickrank.core.cache import EmbeddingCache
from tests.support.terminal import run_in_pty


def _cache_with_entries(path) -> None:
    import numpy as np

    c = EmbeddingCache(path)
    c.put_many({"k1": np.ones(4, np.float32), "k2": np.zeros(4, np.float32)}, "model-a|fp32|x")
    c.close()


def test_clear_all_asks_on_a_terminal(tmp_path):
    cache = tmp_path / "c.sqlite3"
    _cache_with_entries(cache)
    env = {**os.environ, "PICKRANK_CACHE": str(cache)}
    code, raw = run_in_pty(["-m", "pickrank", "cache", "clear"], env, tmp_path, typed="n\n")
    assert code == 1, raw
    assert f"Delete every cached embedding in {cache}? [y/N]" in raw and "nothing deleted" in raw
    assert EmbeddingCache(cache).info().entries == 2
    code, raw = run_in_pty(["-m", "pickrank", "cache", "clear"], env, tmp_path, typed="y\n")
    assert code == 0 and "deleted 2 entries" in raw, raw


def test_yes_and_scripts_are_not_asked(runner, tmp_path):
    cache = tmp_path / "c.sqlite3"
    _cache_with_entries(cache)
    code, raw = run_in_pty(["-m", "pickrank", "cache", "clear", "--yes"], {**os.environ, "PICKRANK_CACHE": str(cache)},
                           tmp_path, typed="")
    assert code == 0 and "deleted 2 entries" in raw and "[y/N]" not in raw, raw
    _cache_with_entries(cache)
    res = runner.invoke(app, ["cache", "clear", "--cache", str(cache)])  # stdin is not a terminal
    assert res.exit_code == 0 and res.stdout == "deleted 2 entries\n"
