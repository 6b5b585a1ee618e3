"""`pickrank serve --signals`: each image's statistics in the /v1/score answer (the same as the decode workers take
them, from encoded images and from pixel arrays alike) and as /metrics histograms; without it, answers and
/metrics as before."""

from __future__ import annotations

import re

import httpx

from pickrank.inputs.decode import ImageSpec, decode_and_preprocess
from pickrank.inputs.imagestats import STAT_NAMES
from tests.support.server import drawn, post_json, post_st, running_server, scores_of


def test_signals_beside_the_scores_and_in_metrics(model_dir, tmp_path):
    files = drawn(tmp_path, 3)
    spec = ImageSpec()
    want = [decode_and_preprocess("k", f.read_bytes(), spec, stats=True).stats for f in files]
    with running_server(model_dir, "--signals", "--max-pixels", "100000") as server:
        server.wait_ready()
        plain = post_json(server.url, "a red cat", files)
        arrays = post_st(server.url, "a red cat", files)
        metrics = httpx.get(server.url + "/metrics", timeout=30).text
    for response in (plain, arrays):
        scores_of(response)
        got = response.json()["signals"]
        assert len(got) == len(files)
        for g, w in zip(got, want):
            assert list(g) == list(STAT_NAMES)
            for name in STAT_NAMES:
                assert g[name] == getattr(w, name)
    for name in STAT_NAMES:
        count = re.search(rf"^pickrank_image_{name}_count (\S+)$", metrics, re.M)
        assert count and float(count.group(1)) == 2 * len(files)
