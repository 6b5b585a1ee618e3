"""`pickrank filter` through the real CLI: the kept samples by --min-score, --top-fraction over the whole dataset
and --top-k per prompt, DataComp's sorted u8,u8 uids.npy, new shards with every kept member byte for byte, and the
usage errors (nothing to filter by, nothing to write, scores of different runs, samples without uids)."""

from __future__ import annotations

import math
import tarfile

import numpy as np
import pytest

from pickrank.cli.app import app
from tests.support.shards import build_shards, read_records

pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def scored(tmp_path_factory, model_dir):
    """Three shards of five samples (two captions), scored against their captions into one parquet per shard."""
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("filter")
    built = build_shards(root / "shards", n_shards=3, per_shard=5)
    res = CliRunner().invoke(app, ["score", str(root / "shards"), "--prompt-from", "caption", "-o",
                                   str(root / "scores") + "/", "--model", str(model_dir), "--no-cache",
                                   "--workers", "0"])
    assert res.exit_code == 0, res.output
    records = [r for p in sorted((root / "scores").glob("*.parquet")) for r in read_records(p)]
    return root, built, records


def run(runner, *args):
    return runner.invoke(app, ["filter", *map(str, args)])


def kept_keys(path) -> list[str]:
    return [r["key"] for r in read_records(path)]


def test_min_score_keeps_what_scores_at_least_that(runner, scored, tmp_path):
    root, built, records = scored
    cut = float(np.median([r["score"] for r in records]))
    res = run(runner, root / "scores", "--min-score", cut, "-o", tmp_path / "kept.parquet")
    assert res.exit_code == 0, res.output
    assert sorted(kept_keys(tmp_path / "kept.parquet")) == sorted(r["key"] for r in records if r["score"] >= cut)
    meta = pq.read_metadata(tmp_path / "kept.parquet").metadata
    assert b"pickrank.filter" in meta and b"pickrank.provenance" in meta


def test_top_fraction_is_over_the_whole_dataset(runner, scored, tmp_path):
    root, built, records = scored
    res = run(runner, root / "scores/{00000..00002}.parquet", "--top-fraction", 0.2, "-o", tmp_path / "k.parquet")
    assert res.exit_code == 0, res.output
    best = sorted(records, key=lambda r: -r["score"])[:math.ceil(0.2 * len(records))]
    assert sorted(kept_keys(tmp_path / "k.parquet")) == sorted(r["key"] for r in best)
    assert "kept 3 of 15 sample(s)" in res.stderr


def test_top_k_per_prompt(runner, scored, tmp_path):
    root, built, records = scored
    res = run(runner, root / "scores", "--top-k", 2, "-o", tmp_path / "k.parquet")
    assert res.exit_code == 0, res.output
    expected = []
    for prompt in {r["prompt"] for r in records}:
        expected += [r["key"] for r in sorted((r for r in records if r["prompt"] == prompt),
                                              key=lambda r: -r["score"])[:2]]
    assert sorted(kept_keys(tmp_path / "k.parquet")) == sorted(expected)


def test_uids_are_datacomps_sorted_u8_u8_array(runner, scored, tmp_path):
    root, built, records = scored
    res = run(runner, root / "scores", "--top-fraction", 0.5, "--uids", tmp_path / "uids.npy")
    assert res.exit_code == 0, res.output
    uids = np.load(tmp_path / "uids.npy", allow_pickle=False)
    assert uids.dtype == np.dtype("u8,u8") and uids.ndim == 1
    assert uids.tolist() == sorted(uids.tolist())
    kept = sorted(records, key=lambda r: -r["score"])[:math.ceil(0.5 * len(records))]
    assert sorted(uids.tolist()) == sorted((int(r["uid"][:16], 16), int(r["uid"][16:], 16)) for r in kept)


def test_reshard_copies_every_kept_member_byte_for_byte(runner, scored, tmp_path):
    root, built, records = scored
    out = tmp_path / "resharded"
    res = run(runner, root / "scores", "--top-fraction", 0.6, "--reshard", out, "--samples-per-shard", 4)
    assert res.exit_code == 0, res.output
    kept = {r["key"] for r in sorted(records, key=lambda r: -r["score"])[:math.ceil(0.6 * len(records))]}
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{i:05d}.tar" for i in range(math.ceil(len(kept) / 4))]  # no temp file left
    copied: dict[str, bytes] = {}
    order = []
    for name in names:
        with tarfile.open(out / name) as tar:
            for m in tar.getmembers():
                copied[m.name] = tar.extractfile(m).read()
                order.append(m.name.split(".")[0])
    assert {k for k in order} == kept
    assert order == sorted(order, key=lambda k: (k[:5], k))  # in the dataset's order
    for key in kept:
        for member, data in built.members[key].items():
            assert copied[member] == data


def test_what_filter_refuses(runner, scored, tmp_path):
    root, built, records = scored
    res = run(runner, root / "scores", "-o", tmp_path / "k.parquet")
    assert res.exit_code == 2 and "nothing to filter by" in res.stderr
    res = run(runner, root / "scores", "--top-k", 1)
    assert res.exit_code == 2 and "say what to write" in res.stderr
    res = run(runner, root / "scores", "--top-fraction", 1.5, "-o", tmp_path / "k.parquet")
    assert res.exit_code == 2 and "--top-fraction 1.5" in res.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "00000.tar").write_bytes(b"")
    res = run(runner, root / "scores", "--top-k", 1, "--reshard", tmp_path / "full")
    assert res.exit_code == 2 and "already holds shards" in res.stderr
    res = run(runner, root / "shards", "--top-k", 1, "-o", tmp_path / "k.parquet")
    assert res.exit_code == 2 and "not a dataset's scores" in res.stderr, res.output
    assert not (tmp_path / "k.parquet").exists()


def test_scores_of_different_runs_are_not_mixed(runner, model_dir, scored, tmp_path):
    root, built, records = scored
    res = runner.invoke(app, ["score", str(root / "shards" / "00000.tar"), "--prompt-from", "caption", "--scale",
                              "cosine", "-o", str(tmp_path / "other.parquet"), "--model", str(model_dir),
                              "--no-cache", "--workers", "0"])
    assert res.exit_code == 0, res.output
    res = run(runner, root / "scores" / "00001.parquet", tmp_path / "other.parquet", "--top-k", 1, "-o",
              tmp_path / "k.parquet")
    assert res.exit_code == 2 and "scored another way" in res.stderr and "scale" in res.stderr


def test_uids_need_uids_and_nothing_is_written_without(runner, model_dir, scored, tmp_path):
    root, built, records = scored
    from tests.support.shards import image_bytes, write_parquet

    data = write_parquet(tmp_path / "d.parquet", {"key": ["a", "b"], "jpg": [image_bytes(1), image_bytes(2)]})
    res = runner.invoke(app, ["score", str(data), "-p", "a cat", "-o", str(tmp_path / "s.parquet"), "--model",
                              str(model_dir), "--no-cache", "--workers", "0"])
    assert res.exit_code == 0, res.output
    res = run(runner, tmp_path / "s.parquet", "--top-k", 1, "--uids", tmp_path / "u.npy", "-o",
              tmp_path / "k.parquet")
    assert res.exit_code == 2 and "no 128-bit hex uid" in res.stderr
    assert not (tmp_path / "u.npy").exists() and not (tmp_path / "k.parquet").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_shard_changed_since_it_was_scored_is_not_resharded(runner, scored, tmp_path):
    root, built, records = scored
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root / "shards", copy / "shards")
    shutil.copytree(root / "scores", copy / "scores")
    # the scores name the original shards: touch one of them after scoring, then put it back
    shard = root / "shards" / "00001.tar"
    st = shard.stat()
    shard.touch()
    try:
        res = run(runner, root / "scores", "--top-k", 5, "--reshard", tmp_path / "r")
        assert res.exit_code == 2 and "changed since it was scored" in res.stderr
        assert not list((tmp_path / "r").iterdir())
    finally:
        import os

        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
