"""`pickrank compare --series / --signals / --monitor-model`: known answers on checkpoints drawn for them (rising
saturation raises the flag; copies have no diversity, distinct pictures plenty; a checkerboard raises the
high-frequency signal; a second tiny model as the held-out scorer disagrees and is flagged; step_100 after step_20),
the same figures in the table, JSON and CSV."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from pickrank.analysis.comparison import ScoreTable, compare_systems
from pickrank.analysis.comparison.plan import Comparison, Slot, as_series
from pickrank.analysis.comparison.watch import (
    DEFAULT_THRESHOLDS,
    mean_cosine_distance,
    parse_thresholds,
    watch_signals,
)
from pickrank.cli.app import app
from pickrank.core.kept import Kept
from pickrank.devtools import build_model
from pickrank.errors import UsageError
from pickrank.inputs.imagestats import ImageStats
from tests.support.series import build_series, checkerboard, copies, same, saturated
from tests.support.shared import built_once

# For the tiny models (seeds 0 and 1) this prompt's PickScore rises with saturation and the second model's score
# falls (found by scoring a few prompts once): the set on which the two disagree.
PROMPT = "city at night"
CHECKPOINTS = {"step_0": same, "step_100": saturated(2.2), "step_20": saturated(1.4), "step_300": saturated(3.0)}


@pytest.fixture(scope="module")
def monitor_dir(tmp_path_factory):
    """A second tiny CLIP (another seed): the held-out scorer."""
    def build(path):
        path.mkdir(parents=True)
        build_model(path, seed=1)
    return built_once(tmp_path_factory, "tiny-clip-monitor", build)


def compare(model_dir, cache, *args):
    result = CliRunner().invoke(app, ["compare", *args, "--model", str(model_dir), "--cache", str(cache),
                                      "--workers", "0", "--bootstrap", "1000"])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def series(tmp_path_factory, model_dir, monitor_dir):
    """A run of four checkpoints whose saturation rises, compared as a series with the held-out scorer: its JSON,
    CSV and table (the last two from the cache)."""
    root = tmp_path_factory.mktemp("series")
    prompts = build_series(root / "run", CHECKPOINTS, prompt=PROMPT)
    args = [str(root / "run" / "step_*"), "--prompts", str(prompts), "--series", "--monitor-model", str(monitor_dir)]
    cache = root / "cache.sqlite3"
    doc = json.loads(compare(model_dir, cache, *args, "-f", "json", "--html", str(root / "run.html")))
    rows = list(csv.DictReader(io.StringIO(compare(model_dir, cache, *args, "-f", "csv"))))
    table = compare(model_dir, cache, *args)
    return doc, rows, table, root / "run.html"


def test_the_series_is_ordered_by_the_number_in_each_name(series):
    doc, _, _, _ = series
    assert [s["name"] for s in doc["systems"]] == ["step_0", "step_20", "step_100", "step_300"]
    assert doc["settings"]["baseline"] == "step_0"
    pairs = {(p["system"], p["reference"]) for p in doc["pairs"]}
    assert pairs == {("step_20", "step_0"), ("step_100", "step_0"), ("step_300", "step_0"),
                     ("step_100", "step_20"), ("step_300", "step_100")}


def test_rising_saturation_rises_and_is_flagged_with_the_held_out_disagreement(series):
    doc, _, _, _ = series
    sig = doc["signals"]
    sats = [s["signals"]["saturation"]["mean"] for s in sig["systems"]]
    assert sats == sorted(sats) and sats[-1] > 1.5 * sats[0]
    means = [s["mean"] for s in doc["systems"]]
    assert means == sorted(means)  # the prompt built for it: PickScore rises with saturation
    held_out = [s["monitor"]["mean"] for s in sig["systems"]]
    assert held_out == sorted(held_out, reverse=True) and all(h > 0 for h in held_out)
    flags = {(f["system"], f["signal"]) for f in sig["flags"]}
    assert {("step_100", "saturation"), ("step_300", "saturation")} <= flags
    assert ("step_300", "monitor") in flags
    d = sig["systems"][3]["monitor_diff"]
    assert d["high"] < 0
    assert sig["monitor_model"] and sig["monitor"]["model"]  # the held-out model's provenance


def test_the_table_and_csv_carry_the_same_figures(series):
    doc, rows, table, _ = series
    assert "win vs previous" in table and "FLAG step_300: saturation" in table
    flag_rows = [r for r in rows if r["kind"] == "flag"]
    assert len(flag_rows) == len(doc["signals"]["flags"])
    sat = {r["system"]: float(r["mean"]) for r in rows if r["kind"] == "signal" and r["signal"] == "saturation"}
    for s in doc["signals"]["systems"]:
        assert sat[s["name"]] == pytest.approx(s["signals"]["saturation"]["mean"])
    assert any(r["kind"] == "pair" and (r["system"], r["reference"]) == ("step_300", "step_100") for r in rows)


def test_diversity_and_high_frequencies_of_two_plain_systems(tmp_path, model_dir):
    prompts = build_series(tmp_path / "ab", {"distinct": same, "copies": copies, "textured": checkerboard},
                           samples=3)
    doc = json.loads(compare(model_dir, tmp_path / "c.sqlite3", str(tmp_path / "ab" / "distinct"),
                             str(tmp_path / "ab" / "copies"), str(tmp_path / "ab" / "textured"), "--prompts",
                             str(prompts), "--signals", "-f", "json"))
    by = {s["name"]: s for s in doc["signals"]["systems"]}
    assert by["copies"]["signals"]["diversity"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert by["distinct"]["signals"]["diversity"]["mean"] > 0.01
    assert by["distinct"]["signals"]["diversity"]["prompts"] == 20
    assert by["textured"]["signals"]["hf_energy"]["mean"] > 10 * by["distinct"]["signals"]["hf_energy"]["mean"]
    assert doc["signals"]["series"] is False


def test_diversity_is_the_mean_pairwise_cosine_distance():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(5, 8))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    want = np.mean([1 - e[i] @ e[j] for i in range(5) for j in range(5) if i != j])
    assert mean_cosine_distance(e) == pytest.approx(want)
    assert mean_cosine_distance(np.repeat(e[:1], 4, axis=0)) == pytest.approx(0.0, abs=1e-12)
    assert mean_cosine_distance(e[:1]) is None


def _kept(table: ScoreTable, sat: dict[str, float]) -> Kept:
    kept = Kept()
    for row in table.prompts:
        for samples in row.samples:
            for x in samples:
                kept.name(x.path, x.path)
                kept.put(x.path, np.ones(4) / 2, ImageStats(sat[x.path], 0.5, 0.1, 10.0, 5.0, 0.01))
    return kept


def test_flags_follow_their_thresholds_and_never_change_the_scores():
    from pickrank.analysis.comparison.stats import PromptScores, Sample

    prompts = tuple(PromptScores(str(i), "p", ((Sample(f"a{i}", 20.0 + i % 3),), (Sample(f"b{i}", 21.0 + i % 3),)))
                    for i in range(20))
    table = ScoreTable(("a", "b"), "a", prompts)
    result = compare_systems(table, bootstrap=200)
    kept = _kept(table, {**{f"a{i}": 0.40 for i in range(20)}, **{f"b{i}": 0.52 for i in range(20)}})  # +30%
    flagged = watch_signals(table, result, kept)
    assert [(f.system, f.signal) for f in flagged.flags] == [("b", "saturation")]
    assert "saturation +30%" in flagged.flags[0].text and "b" in flagged.flags[0].text
    assert not watch_signals(table, result, kept, thresholds=parse_thresholds(["saturation=+35"])).flags
    assert not watch_signals(table, result, kept, thresholds=parse_thresholds(["saturation=off"])).flags
    # PickScore falling: no flag, whatever the saturation
    backwards = compare_systems(table, baseline="b", bootstrap=200)
    assert not watch_signals(table, backwards, _kept(table, {**{f"a{i}": 0.52 for i in range(20)},
                                                             **{f"b{i}": 0.40 for i in range(20)}})).flags
    assert compare_systems(table, bootstrap=200) == result


def test_bad_flags_are_usage_errors():
    assert parse_thresholds([]) == DEFAULT_THRESHOLDS
    for bad in ("saturation", "nope=10", "saturation=lots", "saturation=0"):
        with pytest.raises(UsageError):
            parse_thresholds([bad])


def test_as_series_orders_numbers_as_numbers():
    plan = Comparison("prompts-csv", ("step_100", "step_20", "step_3"), "step_100",
                      (Slot("1", "p", (("c",), ("b",), ("a",))),))
    ordered = as_series(plan)
    assert ordered.systems == ("step_3", "step_20", "step_100") and ordered.baseline == "step_3"
    assert ordered.slots[0].images == (("a",), ("b",), ("c",))
