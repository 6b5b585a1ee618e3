"""`pickrank eval`: the Pick-a-Pic accuracy protocol, on data whose answer is known from the tiny model's scores."""

from __future__ import annotations

import json
import os
import sys

import pytest

from pickrank.analysis.evaluate import (
    TIE,
    Dataset,
    accuracy,
    bootstrap_interval,
    choose_threshold,
    credit,
    pair_probs,
    parquet_label,
    predict,
)
from pickrank.cli.app import app
from tests.support.pairs import write_csv

N_PAIRS = 6


# -- the protocol, by hand -------------------------------------------------------------------------------

def test_credit_rule():
    assert credit(0, 0) == 1 and credit(1, 1) == 1 and credit(TIE, TIE) == 1
    assert credit(0, 1) == 0 and credit(1, 0) == 0
    assert credit(TIE, 0) == credit(TIE, 1) == credit(0, TIE) == credit(1, TIE) == 0.5


def test_probs_prediction_and_threshold_ties():
    p0, p1 = pair_probs(2.0, 1.0)  # softmax(2, 1) = (0.7311, 0.2689): |p0 - p1| = 0.4621
    assert (p0, p1) == pytest.approx((0.7310586, 0.2689414))
    assert pair_probs(1000.0, -1000.0) == (1.0, 0.0)  # no overflow
    assert predict(p0, p1, 0.0) == 0 and predict(p1, p0, 0.0) == 1
    assert predict(p0, p1, 0.4) == 0  # 0.4621 > 0.4: a preference
    assert predict(p0, p1, 0.5) == TIE  # 0.4621 <= 0.5: a tie
    assert predict(0.5, 0.5, 0.0) == TIE  # equal scores are a tie even at threshold 0
    # two rows checked by hand: scores (2, 1) labelled 0, scores (1, 1.2) labelled tie
    probs = [pair_probs(2.0, 1.0), pair_probs(1.0, 1.2)]  # |p0 - p1|: 0.4621 and 0.0997
    labels = [0.0, TIE]
    assert accuracy(labels, probs, 0.0) == (1 + 0.5) / 2  # predictions 0, 1
    assert accuracy(labels, probs, 0.1) == (1 + 1) / 2  # predictions 0, tie
    assert accuracy(labels, probs, 0.5) == (0.5 + 1) / 2  # predictions tie, tie
    assert choose_threshold(labels, probs) == (0.1, 1.0)  # the smallest of the best


def test_bootstrap_is_seeded():
    credits = [1, 0, 0.5, 1, 1, 0, 1, 1]
    a, b = bootstrap_interval(credits, 500, seed=1), bootstrap_interval(credits, 500, seed=1)
    assert a == b and a[0] <= sum(credits) / len(credits) <= a[1]
    assert bootstrap_interval(credits, 0) is None
    assert bootstrap_interval([1.0] * 10, 100) == (1.0, 1.0)


def test_parquet_labels():
    assert parquet_label(1, 0) == 0 and parquet_label(0, 1) == 1 and parquet_label(0.5, 0.5) == TIE
    with pytest.raises(ValueError):
        parquet_label(1, 1)


# -- data whose answer is known ---------------------------------------------------------------------------





def write_parquet(path, rows, labels):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    to01 = {0.0: (1.0, 0.0), 1.0: (0.0, 1.0), TIE: (0.5, 0.5)}
    table = pa.table({
        "caption": [r["prompt"] for r in rows],
        "jpg_0": pa.array([r["bytes"][0] for r in rows], type=pa.binary()),
        "jpg_1": pa.array([r["bytes"][1] for r in rows], type=pa.binary()),
        "label_0": [to01[lab][0] for lab in labels],
        "label_1": [to01[lab][1] for lab in labels],
        "are_different": [True] * len(rows),  # extra columns are ignored
    })
    pq.write_table(table, path, row_group_size=2)
    return str(path)


def run_eval(runner, model_dir, *args):
    res = runner.invoke(app, ["eval", *map(str, args), "--model", str(model_dir), "--json", "-q"])
    return res, (json.loads(res.stdout) if res.exit_code in (0, 3) else None)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_known_answers(pairs_data, model_dir, runner, tmp_path, kind):
    folder, rows = pairs_data
    best = [r["best"] for r in rows]
    write = write_csv if kind == "csv" else write_parquet
    for labels, expected in [(best, 1.0), ([1 - b for b in best], 0.0), ([TIE] * N_PAIRS, 0.5)]:
        data = write(folder / f"d.{kind}", rows, labels)
        res, summary = run_eval(runner, model_dir, data)
        assert res.exit_code == 0, res.output
        assert summary["accuracy"] == expected
        assert summary["pairs"] == N_PAIRS and summary["skipped"] == 0
        assert summary["label_ties"] == labels.count(TIE) and summary["predicted_ties"] == 0
        assert summary["threshold"] == 0.0
        assert summary["embedded_images"] == 9  # each distinct image embedded once
    assert summary["ci"] == [0.5, 0.5]


def test_output_file_and_hand_checked_rows(pairs_data, model_dir, runner, tmp_path):
    folder, rows = pairs_data
    gaps = [abs(p0 - p1) for p0, p1 in (pair_probs(*r["scores"]) for r in rows)]
    # a threshold between two pairs' |p0 - p1|: the closer pair becomes a predicted tie, the other does not
    order = sorted(range(N_PAIRS), key=gaps.__getitem__)
    close, far = order[0], order[-1]
    assert gaps[close] < gaps[far]
    threshold = round((gaps[close] + gaps[far]) / 2, 6)
    labels = [r["best"] for r in rows]
    labels[far] = TIE  # label tie, predicted preference: 0.5
    data = write_csv(folder / "hand.csv", rows, labels)
    out = tmp_path / "pairs.jsonl"
    res, summary = run_eval(runner, model_dir, data, "--tie-threshold", threshold, "-o", out)
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in recs] == list(range(N_PAIRS))
    assert list(recs[0]) == ["index", "prompt", "score_0", "score_1", "p_0", "p_1", "label", "prediction",
                             "credit", "error"]
    for rec, row, gap in zip(recs, rows, gaps):
        assert [rec["score_0"], rec["score_1"]] == pytest.approx(row["scores"], abs=1e-4)
        assert rec["p_0"] + rec["p_1"] == pytest.approx(1.0)
        assert rec["prompt"] == row["prompt"]
        assert rec["prediction"] == (TIE if gap <= threshold else row["best"])
    assert recs[close]["prediction"] == TIE and recs[close]["credit"] == 0.5  # predicted tie, label not
    assert recs[far]["prediction"] == rows[far]["best"] and recs[far]["credit"] == 0.5  # label tie
    assert summary["accuracy"] == pytest.approx(sum(r["credit"] for r in recs) / N_PAIRS)
    assert summary["predicted_ties"] == sum(g <= threshold for g in gaps) and summary["label_ties"] == 1


def test_validation_chooses_the_threshold(pairs_data, model_dir, runner):
    folder, rows = pairs_data
    best = [r["best"] for r in rows]
    # all-tie validation labels: only threshold 1 predicts ties everywhere (accuracy 1, against 0.5 at 0)
    val = write_csv(folder / "val_ties.csv", rows, [TIE] * N_PAIRS)
    test = write_csv(folder / "test.csv", rows, best)
    res, summary = run_eval(runner, model_dir, test, "--validation", val)
    assert res.exit_code == 0, res.output
    assert summary["threshold"] == 1.0 and summary["validation"]["accuracy"] == 1.0
    assert summary["accuracy"] == 0.5 and summary["predicted_ties"] == N_PAIRS  # applied to the test data
    # validation labels that the model gets right: threshold 0 is best
    val = write_csv(folder / "val_right.csv", rows, best)
    res, summary = run_eval(runner, model_dir, test, "--validation", val)
    assert summary["threshold"] == 0.0 and summary["accuracy"] == 1.0
    # the human summary says what was chosen where
    res = runner.invoke(app, ["eval", test, "--validation", val, "--model", str(model_dir), "-q"])
    assert res.exit_code == 0, res.output
    assert "accuracy    1.0000" in res.stdout and "threshold   0.0 (chosen on" in res.stdout
    assert "95% bootstrap CI" in res.stdout and f"pairs       {N_PAIRS}" in res.stdout


def test_jsonl_input_bad_rows_and_parquet_streaming(pairs_data, model_dir, runner, tmp_path):
    folder, rows = pairs_data
    data = folder / "d.jsonl"
    lines = [{"prompt": r["prompt"], "image_0": r["image_0"], "image_1": r["image_1"], "label": r["best"]}
             for r in rows]
    lines.append({"prompt": "x", "image_0": "img/missing.png", "image_1": rows[0]["image_1"], "label": 0})
    lines.append({"prompt": "x", "image_0": rows[0]["image_0"], "image_1": rows[0]["image_1"], "label": 2})
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "o.jsonl"
    res, summary = run_eval(runner, model_dir, data, "-o", out)
    assert res.exit_code == 3, res.output  # some pairs failed
    assert summary["accuracy"] == 1.0 and summary["pairs"] == N_PAIRS and summary["skipped"] == 2
    assert "missing.png: no such file" in res.stderr and "label 2 is not 0, 1 or 0.5" in res.stderr
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert recs[-2]["credit"] is None and "missing.png" in recs[-2]["error"]
    # parquet is read in row batches, across a folder of shards, in order
    pytest.importorskip("pyarrow")
    shards = tmp_path / "shards"
    shards.mkdir()
    write_parquet(shards / "test-00000-of-00002.parquet", rows[:4], [r["best"] for r in rows[:4]])
    write_parquet(shards / "test-00001-of-00002.parquet", rows[4:], [r["best"] for r in rows[4:]])
    ds = Dataset(str(shards), rows_per_batch=3)
    assert ds.count == N_PAIRS
    got = list(ds.pairs())
    assert [p.index for p in got] == list(range(N_PAIRS)) and [p.prompt for p in got] == [r["prompt"] for r in rows]
    assert got[5].image_1 == rows[5]["bytes"][1]
    res, summary = run_eval(runner, model_dir, shards / "test-*-of-00002.parquet")  # a quoted glob of shards
    assert res.exit_code == 0, res.output
    assert summary["accuracy"] == 1.0 and summary["pairs"] == N_PAIRS


def test_usage_errors(pairs_data, model_dir, runner, tmp_path):
    folder, rows = pairs_data
    data = write_csv(folder / "u.csv", rows, [r["best"] for r in rows])
    for args, msg in [([data, "--tie-threshold", "0.2", "--validation", data], "not both"),
                      ([tmp_path / "nope.csv"], "no such file"),
                      ([folder / "img" / "i0.jpg"], "unknown data format"),
                      ([folder / "img" / "*.png"], "must match *.parquet files only")]:
        res = runner.invoke(app, ["eval", *map(str, args), "--model", str(model_dir), "-q"])
        assert res.exit_code == 2 and msg in res.stderr and "Traceback" not in res.stderr, res.output
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,image_0\nx,y\n")
    res = runner.invoke(app, ["eval", str(bad), "--model", str(model_dir), "-q"])
    assert res.exit_code == 2 and "missing column(s) image_1, label" in res.stderr


def test_missing_pyarrow_says_how_to_install(pairs_data, model_dir, runner, tmp_path, monkeypatch):
    path = tmp_path / "test.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    res = runner.invoke(app, ["eval", str(path), "--model", str(model_dir), "-q"])
    assert res.exit_code == 1, res.output
    assert res.stderr.strip() == "pickrank: error: reading parquet needs pyarrow: pip install 'pickrank[eval]'"


def test_parquet_memory_stays_flat(tmp_path):
    """Row batches are read and let go: pyarrow holds about one row group, not the whole file (20 MB here)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    n, size = 40, 250_000
    table = pa.table({"caption": ["p"] * n, "jpg_0": pa.array([os.urandom(size) for _ in range(n)], pa.binary()),
                      "jpg_1": pa.array([os.urandom(size) for _ in range(n)], pa.binary()),
                      "label_0": [1.0] * n, "label_1": [0.0] * n})
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=4, compression="none")
    del table
    base = pa.total_allocated_bytes()
    peak, count = 0, 0
    for pair in Dataset(str(tmp_path / "big.parquet"), rows_per_batch=4).pairs():
        count += 1
        assert len(pair.image_0) == size and pair.label == 0.0
        peak = max(peak, pa.total_allocated_bytes() - base)
    assert count == n
    assert peak < n * size  # under half the file (about 3 row groups); with pre_buffer it grows to all of it
