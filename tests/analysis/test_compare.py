"""`pickrank compare`, library half: the three layouts, the statistics' known answers, the renderers."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pickrank.analysis.comparison import (
    Comparison,
    ScoreTable,
    Slot,
    collect_scores,
    compare_systems,
    csv_rows,
    detect_layout,
    per_prompt_rows,
    plan_comparison,
    print_table,
    sign_test,
    to_json,
    write_csv,
    write_per_prompt,
)
from pickrank.errors import UsageError
from pickrank.records import Record
from tests.support.images import draw_image


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# -- the statistics: known answers -----------------------------------------------------------------------

def test_identical_systems_win_half_diff_zero_p_one():
    rng = np.random.default_rng(3)
    scores = [list(rng.normal(21, 1, size=3)) for _ in range(40)]
    result = compare_systems(ScoreTable.from_scores({"a": scores, "b": [list(s) for s in scores]}), bootstrap=500)
    p = result.pairs[0]
    assert (p.system, p.reference) == ("b", "a")
    assert p.win_rate == 0.5 and p.win_low == 0.5 and p.win_high == 0.5  # exactly, not approximately
    assert p.mean_diff == 0.0 and p.diff_low == 0.0 and p.diff_high == 0.0
    assert p.p_value == 1.0 and p.pref_prob == 0.5 and (p.wins, p.ties, p.losses) == (0, 40, 0)
    assert p.sample_win_rate == 0.5  # every sample pair, a sample against itself a tie: symmetric
    assert result.systems[0].mean == result.systems[1].mean


def test_best_sample_of_the_other_system_wins_every_prompt():
    rng = np.random.default_rng(4)
    a = [list(rng.normal(21, 1, size=4)) for _ in range(30)]
    best = [[max(s)] for s in a]  # the best sample beats the mean of distinct samples
    p = compare_systems(ScoreTable.from_scores({"a": a, "best": best}), bootstrap=200).pairs[0]
    assert p.win_rate == 1.0 and p.win_low == 1.0 and p.losses == 0 and p.wins == 30
    assert p.p_value == 2 / 2 ** 30 and p.mean_diff > 0
    # A prompt whose samples are all equal: its best is its mean, a tie (counted 0.5), not a win.
    a[0] = [20.0] * 4
    best[0] = [20.0]
    p = compare_systems(ScoreTable.from_scores({"a": a, "best": best}), bootstrap=0).pairs[0]
    assert (p.wins, p.ties) == (29, 1) and p.win_rate == pytest.approx(29.5 / 30) and p.win_low is None


@pytest.mark.parametrize("fourth, failed", [([None], 1), ([], 0)])  # its image failed / it has none
def test_hand_checked_four_prompts_one_tie_one_missing(fourth, failed):
    # a is the baseline. Per prompt (a's score = mean of its samples):
    #   1: a 1.0,          b 2.0   -> b wins,  diff +1.0, pref sigmoid(1),    sample pairs: 1 of 1 won
    #   2: a 3.0,          b 3.0   -> tie 0.5, diff  0,   pref 0.5,           sample pairs: 0.5
    #   3: a [2, 4] = 3.0, b 3.5   -> b wins,  diff +0.5, pref sigmoid(0.5),  sample pairs: (1 + 0) / 2 = 0.5
    #   4: a 1.0,          b: its only image failed (counted as failed), or it has none -> left out of the pair
    # win rate (1 + 0.5 + 1) / 3 = 5/6; mean diff 1.5 / 3 = 0.5; sign test: 2 wins, 0 losses (tie dropped),
    # p = 2 * C(2,0) / 2^2 = 0.5; sample-level win rate (1 + 0.5 + 0.5) / 3 = 2/3.
    # means: a (1 + 3 + 3 + 1) / 4 = 2.0 over 4 prompts, 5 images; b (2 + 3 + 3.5) / 3 = 17/6 over 3 prompts.
    table = ScoreTable.from_scores({"a": [[1.0], [3.0], [2.0, 4.0], [1.0]], "b": [[2.0], [3.0], [3.5], fourth]})
    r = compare_systems(table, bootstrap=2000, seed=1)
    a, b = r.systems
    assert (a.mean, a.prompts, a.images, a.failed, a.missing) == (2.0, 4, 5, 0, ())
    assert (b.mean, b.prompts, b.images, b.failed, b.missing) == (pytest.approx(17 / 6), 3, 3, failed, ("4",))
    p = r.pairs[0]
    assert (p.prompts, p.wins, p.ties, p.losses) == (3, 2, 1, 0)
    assert p.win_rate == pytest.approx(5 / 6) and p.mean_diff == pytest.approx(0.5)
    assert p.pref_prob == pytest.approx((sigmoid(1.0) + 0.5 + sigmoid(0.5)) / 3)
    assert p.p_value == 0.5 and p.sample_win_rate == pytest.approx(2 / 3)
    assert p.win_low <= p.win_rate <= p.win_high and p.diff_low <= p.mean_diff <= p.diff_high
    assert a.low <= a.mean <= a.high


def test_bootstrap_interval_covers_true_win_rate():
    """At a true per-prompt win probability of 0.7, the 95% interval covers 0.7 for at least 90 of 100 seeds."""
    covered = 0
    for seed in range(100):
        rng = np.random.default_rng(1000 + seed)
        a = rng.normal(21, 1, size=120)
        b = a + np.where(rng.random(120) < 0.7, 0.3, -0.3)
        p = compare_systems(ScoreTable.from_scores({"a": a[:, None].tolist(), "b": b[:, None].tolist()}),
                    bootstrap=1000, seed=seed).pairs[0]
        covered += p.win_low <= 0.7 <= p.win_high
    assert covered >= 90, covered


def test_deterministic_seed_and_paired_resamples():
    rng = np.random.default_rng(5)
    scores = {s: rng.normal(21, 1, size=(50, 2)).tolist() for s in "abc"}
    t = ScoreTable.from_scores(scores)
    one, two = compare_systems(t, bootstrap=300, seed=7), compare_systems(t, bootstrap=300, seed=7)
    assert one == two
    assert compare_systems(t, bootstrap=300, seed=8).pairs[0].win_low != one.pairs[0].win_low or \
        compare_systems(t, bootstrap=300, seed=8).systems[0].low != one.systems[0].low
    # Every pair sees the same resamples: b vs a computed alone or with all pairs gives the same interval.
    assert compare_systems(t, bootstrap=300, seed=7, all_pairs=True).pair("b", "a") == one.pair("b", "a")


def test_sign_test_matches_the_binomial_sum():
    for wins, losses in [(0, 0), (1, 0), (7, 3), (3, 7), (50, 50), (40, 70), (1500, 1600)]:
        n = wins + losses
        exact = 1.0 if n == 0 else min(1.0, sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) * 2 / 2 ** n)
        assert sign_test(wins, losses) == exact
    assert sign_test(10, 0) == pytest.approx(2 / 1024)


def test_best_of_k_is_exact_over_all_subsets():
    rng = np.random.default_rng(6)
    a = np.round(rng.normal(0, 1, size=(25, 4)), 1)  # rounded: ties among samples and against b happen
    b = np.round(rng.normal(0.2, 1, size=(25, 3)), 1)
    r = compare_systems(ScoreTable.from_scores({"base": b.tolist(), "new": a.tolist()}), bootstrap=100, best_of_n=True)
    curve = next(c for c in r.best_of_k if c.system == "new")
    assert curve.ks == (1, 2, 3, 4) and curve.reference == "base" and curve.prompts == 25

    def brute(k: int) -> float:
        per_prompt = []
        for x, y in zip(a, b):
            subsets = list(itertools.combinations(x, k))
            per_prompt.append(np.mean([np.mean([(max(s) > v) + 0.5 * (max(s) == v) for v in y]) for s in subsets]))
        return float(np.mean(per_prompt))

    assert curve.win == pytest.approx(tuple(brute(k) for k in (1, 2, 3, 4)))
    assert curve.win[0] == pytest.approx(r.pairs[0].sample_win_rate)  # best-of-1 is one sample against one
    assert list(curve.win) == sorted(curve.win)
    assert all(lo <= w <= hi for w, lo, hi in zip(curve.win, curve.low, curve.high))
    assert any(c.system == "base" and c.ks == (1, 2, 3) for c in r.best_of_k)


def test_all_pairs_matrix_is_consistent():
    rng = np.random.default_rng(8)
    t = ScoreTable.from_scores({s: (rng.normal(21, 1, size=(30, 1)) + i * 0.2).tolist() for i, s in enumerate("abc")},
                               baseline="b")
    r = compare_systems(t, all_pairs=True, bootstrap=200)
    assert [(p.system, p.reference) for p in r.pairs] == [("a", "b"), ("c", "b"), ("c", "a")]
    ab, ba = r.pair("a", "b"), r.pair("b", "a")
    assert ba.win_rate == pytest.approx(1 - ab.win_rate) and ba.win_low == pytest.approx(1 - ab.win_high)
    assert ba.mean_diff == pytest.approx(-ab.mean_diff) and (ba.wins, ba.losses) == (ab.losses, ab.wins)
    assert len(compare_systems(t, bootstrap=0).pairs) == 2


def test_bad_settings_are_usage_errors():
    t = ScoreTable.from_scores({"a": [[1.0]], "b": [[2.0]]})
    for kwargs in ({"baseline": "zz"}, {"bootstrap": -1}, {"confidence": 1.5}):
        with pytest.raises(UsageError):
            compare_systems(t, **kwargs)


# -- layouts ---------------------------------------------------------------------------------------------

PROMPTS = {"1": "a red cat", "2": "a blue dog", "3": "a green bird"}


def png_with_prompt(path: Path, seed: int, prompt: str | None) -> Path:
    """A PNG with the prompt in its A1111 `parameters` text chunk (or none)."""
    draw_image(path, (64, 48), seed=seed, fmt="PNG")
    if prompt is not None:
        info = PngInfo()
        info.add_text("parameters", f"{prompt}\nSteps: 20, Sampler: Euler")
        Image.open(path).save(path, pnginfo=info)
    return path


@pytest.fixture
def systems(tmp_path: Path) -> tuple[Path, Path]:
    """Two system folders: prompts 1 and 2 one image each (prompt in metadata), prompt 3 two samples with a
    prompt.txt; dpo lacks prompt 2."""
    base, dpo = tmp_path / "base", tmp_path / "dpo"
    for i, folder in enumerate((base, dpo)):
        png_with_prompt(folder / "1.png", 10 + i, PROMPTS["1"])
        if folder is base:
            png_with_prompt(folder / "2.png", 20, PROMPTS["2"])
        for j in range(2):
            png_with_prompt(folder / "3" / f"s{j}.png", 30 + 2 * i + j, None)
        (folder / "3" / "prompt.txt").write_text(PROMPTS["3"] + "\n")
    return base, dpo


def plan_key(plan: Comparison) -> tuple:
    return plan.systems, plan.baseline, [(s.id, s.prompt, s.images) for s in plan.slots]


def test_three_layouts_give_the_same_plan(systems, tmp_path):
    base, dpo = systems
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("id,prompt\n" + "".join(f"{k},{v}\n" for k, v in PROMPTS.items()))
    manifest = tmp_path / "runs.jsonl"
    rows = [{"system": s.name, "id": k, "prompt": PROMPTS[k], "image": os.path.relpath(p, tmp_path)}
            for s in (base, dpo) for k in PROMPTS
            for p in ([s / f"{k}.png"] if (s / f"{k}.png").exists() else sorted((s / k).glob("*.png"))
                      if (s / k).is_dir() else [])]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest_csv = tmp_path / "runs.csv"
    with open(manifest_csv, "w", newline="") as f:
        w = csv.DictWriter(f, ["system", "id", "prompt", "image"])
        w.writeheader()
        w.writerows(rows)
    by_csv = plan_comparison([str(base), str(dpo)], prompts_csv=str(prompts))
    by_path = plan_comparison([str(base), str(dpo)])
    by_manifest = plan_comparison(manifest=str(manifest))
    by_manifest_csv = plan_comparison([str(manifest_csv)])  # one file argument: a manifest
    assert [p.layout for p in (by_csv, by_path, by_manifest, by_manifest_csv)] == \
        ["prompts-csv", "paired-folders", "manifest", "manifest"]
    assert plan_key(by_csv) == plan_key(by_path) == plan_key(by_manifest) == plan_key(by_manifest_csv)
    assert by_csv.systems == ("base", "dpo") and by_csv.baseline == "base"
    assert by_csv.slots[2].images[0] == (str(base / "3" / "s0.png"), str(base / "3" / "s1.png"))
    assert by_csv.missing() == [("dpo", "2")]
    sets = by_csv.candidate_sets()
    assert [s.queries[0].id for s in sets] == ["1", "2", "3"] and len(list(sets[2].paths)) == 4
    assert len(by_csv.image_paths()) == 7


def test_layouts_give_the_same_numbers_with_the_real_model(systems, tmp_path, model_dir):
    from pickrank.api import PickScorer

    base, dpo = systems
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\n" + "".join(f"{v}\n" for v in PROMPTS.values()))  # ids: the row numbers
    scorer = PickScorer.from_pretrained(str(model_dir), device="cpu")
    results = []
    for plan in (plan_comparison([str(base), str(dpo)], prompts_csv=str(prompts)),
                 plan_comparison([str(base), str(dpo)])):
        records = []
        for s in plan.candidate_sets():
            paths = list(s.paths)
            scores = scorer.score(s.queries[0].prompt, paths).tolist()
            records += [Record(prompt=s.queries[0].prompt, path=p, score=v) for p, v in zip(paths, scores)]
        table = collect_scores(plan, records)
        results.append(compare_systems(table, bootstrap=500, seed=3))
    one, two = results
    assert one.systems == two.systems and one.pairs == two.pairs
    assert one.systems[1].missing == ("2",) and one.pairs[0].prompts == 2


def test_prompts_csv_matches_zero_padded_and_text_ids(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    draw_image(a / "00042.png", (32, 32), seed=1)
    draw_image(b / "42.jpg", (32, 32), seed=2)
    draw_image(a / "abc.png", (32, 32), seed=3)
    draw_image(b / "abc" / "x.png", (32, 32), seed=4)
    draw_image(b / "abc" / "y.png", (32, 32), seed=5)
    draw_image(a / "stray.png", (32, 32), seed=6)
    prompts = tmp_path / "p.csv"
    prompts.write_text("id;prompt\n42;forty-two\nabc;letters\n")  # delimiter sniffed, as in batch
    plan = plan_comparison([str(a), str(b)], prompts_csv=str(prompts), names=["old", "new"], baseline="new")
    assert plan.systems == ("old", "new") and plan.baseline == "new"
    assert plan.slots[0].images == ((str(a / "00042.png"),), (str(b / "42.jpg"),))
    assert plan.slots[1].images == ((str(a / "abc.png"),), (str(b / "abc" / "x.png"), str(b / "abc" / "y.png")))


def test_paired_folders_prompt_disagreement_is_reported(tmp_path, caplog):
    a, b = tmp_path / "a", tmp_path / "b"
    png_with_prompt(a / "x.png", 1, "a cat")
    png_with_prompt(b / "x.png", 2, "a dog")
    png_with_prompt(a / "y.png", 3, "a bird")
    png_with_prompt(b / "y.png", 4, None)  # no prompt on one side: the other side's is used
    png_with_prompt(a / "z.png", 5, None)
    png_with_prompt(b / "z.png", 6, None)
    plan = plan_comparison([str(a), str(b)])
    assert [(s.id, s.prompt) for s in plan.slots] == [("y", "a bird")]
    assert [e.id for e in plan.excluded] == ["x", "z"]
    assert "disagree" in plan.excluded[0].reason and "'a cat'" in plan.excluded[0].reason
    assert "no prompt" in plan.excluded[1].reason
    assert "x: left out of the comparison" in caplog.text


@pytest.mark.parametrize("setup, message", [
    (lambda d: [str(d / "a")], "at least two"),
    (lambda d: [str(d / "a"), str(d / "nope")], "not a folder"),
    (lambda d: [str(d / "a"), str(d / "x" / "a")], "both named 'a'"),
])
def test_bad_folders(tmp_path, setup, message):
    draw_image(tmp_path / "a" / "1.png", (16, 16), seed=1)
    draw_image(tmp_path / "x" / "a" / "1.png", (16, 16), seed=1)
    with pytest.raises(UsageError, match=message):
        plan_comparison(setup(tmp_path))


@pytest.mark.parametrize("name, content, message", [
    ("m.jsonl", '{"system": "a", "prompt": "p"}\n', "no 'image'"),
    ("m.jsonl", '{"system": "a", "prompt": "p", "image": "x.png"}\nnot json\n', "line 2: not JSON"),
    ("m.jsonl", '[1, 2]\n', "not an object"),
    ("m.csv", "system,prompt\na,p\n", "no 'image'"),
    ("m.csv", b"system,prompt,image\na,caf\xe9,x.png\n", "not UTF-8 (line 2"),
    ("m.jsonl", '{"system": "a", "prompt": "p", "image": "x.png"}\n', "at least two systems"),
])
def test_bad_manifest(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UsageError, match=re.escape(message)):
        plan_comparison(manifest=str(path))


def test_manifest_paths_relative_to_it_and_options(tmp_path):
    sub = tmp_path / "m"
    sub.mkdir()
    path = sub / "m.jsonl"
    path.write_text('{"system": "a", "prompt": "p", "image": "i/1.png"}\n'
                    '{"system": "b", "prompt": "p", "image": "/abs/2.png"}\n'
                    '{"system": "b", "prompt": "q", "image": "3.png", "id": 7}\n')
    plan = plan_comparison(manifest=str(path), names=["A", "B"], baseline="B")
    assert plan.systems == ("A", "B") and plan.baseline == "B"
    assert plan.slots[0].images == ((str(sub / "i" / "1.png"),), ("/abs/2.png",))
    assert plan.slots[1].id == "7" and plan.missing() == [("A", "7")]
    for kwargs, message in (({"names": ["x"]}, "--names gives 1"), ({"baseline": "c"}, "--baseline 'c'"),
                            ({"prompts_csv": "p.csv"}, "--prompts goes with")):
        with pytest.raises(UsageError, match=message):
            plan_comparison(manifest=str(path), **kwargs)
    with pytest.raises(UsageError, match="either --manifest or"):
        detect_layout(["a", "b"], manifest=str(path))


def test_prompts_csv_bad_rows(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    draw_image(a / "1.png", (16, 16), seed=1)
    draw_image(b / "1.png", (16, 16), seed=2)
    p = tmp_path / "p.csv"
    p.write_text("id,prompt\n1,x\n01,y\n")
    with pytest.raises(UsageError, match="repeats row 1"):
        plan_comparison([str(a), str(b)], prompts_csv=str(p))
    p.write_text("id,prompt\n1, \n")
    with pytest.raises(UsageError, match="row 1 has an empty prompt"):
        plan_comparison([str(a), str(b)], prompts_csv=str(p))


def test_collect_scores_counts_failed_and_unscored_images(tmp_path):
    plan = Comparison("manifest", ("a", "b"), "a", (Slot("1", "p", (("x.png", "y.png"), ("z.png",))),))
    records = [Record(prompt="p", path="x.png", score=1.0), Record(prompt="p", path="./y.png", error="not an image")]
    table = collect_scores(plan, records)
    samples = table.prompts[0].samples
    assert samples[0][0].score == 1.0 and samples[0][1].error == "not an image"
    assert samples[1][0].error == "not scored"
    r = compare_systems(table, bootstrap=0)
    assert (r.systems[0].images, r.systems[0].failed) == (1, 1)
    assert (r.systems[1].images, r.systems[1].failed, r.systems[1].missing) == (0, 1, ("1",))
    assert r.pairs[0].prompts == 0 and r.pairs[0].win_rate is None and r.pairs[0].p_value == 1.0


# -- renderers -------------------------------------------------------------------------------------------

def small_result():
    table = ScoreTable.from_scores({"base": [[1.0], [3.0], [2.0, 4.0], [1.0]],
                                    "=evil\x1b[31m": [[2.0], [3.0], [3.5], []]},
                                   prompts=["p1", "p2", "p3", "p4"])
    return table, compare_systems(table, bootstrap=200, all_pairs=True, best_of_n=True)


def test_table_escapes_control_characters():
    table, result = small_result()
    out = io.StringIO()
    print_table(result, out)
    text = out.getvalue()
    assert "\x1b" not in text and "\\x1b[31m" in text and "0.833" in text and "baseline" in text
    assert "win rate of row over column" in text


def test_json_csv_and_per_prompt():
    table, result = small_result()
    data = json.loads(json.dumps(to_json(result, model={"model": "m", "revision": "r"})))
    assert data["settings"] == {"baseline": "base", "all_pairs": True, "bootstrap": 200, "seed": 0,
                                "confidence": 0.95, "layout": "scores"}
    assert data["model"] == {"model": "m", "revision": "r"} and data["prompts"] == 4
    assert data["systems"][1]["missing"] == ["4"] and data["pairs"][0]["win_rate"] == pytest.approx(5 / 6)
    out = io.StringIO()
    write_csv(result, out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["kind"] for r in rows] == ["system", "system", "pair"]  # b has one sample: no best-of-k curve
    assert rows[1]["system"] == "'=evil\x1b[31m" and rows[2]["reference"] == "base"
    assert len(list(csv_rows(result))) == 3
    out = io.StringIO()
    write_per_prompt(table, out)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["winner"] for r in lines] == ["=evil\x1b[31m", None, "=evil\x1b[31m", None]
    assert lines[2]["scores"] == {"base": 3.0, "=evil\x1b[31m": 3.5}
    assert lines[2]["samples"]["base"] == [{"path": None, "score": 2.0, "error": None},
                                          {"path": None, "score": 4.0, "error": None}]
    assert list(per_prompt_rows(table))[3]["samples"]["=evil\x1b[31m"] == []
